"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv:2306.00978): pure math, no I/O, no pipeline.

For the linears W_k [out_k, in] that read one input X [n, in] (an input-sharing group):

1. statistics: the per-channel mean |x| over every calibration token, and the second moment
   H = X^T X / n (float32 [in, in], as GPTQ's Hessian), which makes every output error exact
   over all tokens: ||X D^T||^2 / n = sum((D H) * D) for a weight difference D (while there are
   fewer tokens than input columns the token rows are kept instead and the error is computed
   from them: the same number, with less arithmetic; see `InputStats`);
2. scale search: s = mean|x|^alpha / sqrt(max x min) for alpha = 0, 1/n_grid, ... (alpha 0 is
   plain round-to-nearest), the one minimising sum_k ||X W_k^T - (X / s) Q(W_k s)^T||^2, the
   MSE of the group's outputs between float weights and quantized scaled weights;
3. (the caller folds 1/s into the module that produces X and s into the W_k's columns);
4. clipping search: per output row and input group, shrink the group's max |w| by 1 - i/n_grid
   for i < max_shrink x n_grid and keep the shrink with the least output error of that group
   (the group's diagonal block of H: exact over all tokens, no subsampling);
5. group-wise round-to-nearest with AutoAWQ's semantics: zero point scales = (max - min) / 15,
   zeros = round(-min / scales); symmetric scales = max |w| / 7, codes -8..7; W = (q - z) x s.

Scales are rounded to the dtype the checkpoint stores them in (fp16 for AWQ gemm, the model's
dtype for compressed-tensors) before the codes are computed, so the dequantized weight here is
bit for bit the weight a loader rebuilds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ROW_CHUNK = 4096  # output rows per matmul in the searches (bounds the temporaries)


@dataclass(frozen=True)
class AWQConfig:
    """The AWQ scheme: `bits` per weight (4), `group_size` input columns per scale (> 0),
    `zero_point` asymmetric codes with zeros (AutoAWQ's default) or symmetric ones, `n_grid`
    alphas of the scale search, `clip` the clipping search with `clip_grid` steps of which the
    first max_shrink x clip_grid are tried, `scale_dtype` what the scales are rounded to."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    scale_dtype: str = "float16"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)


class InputStats:
    """Running mean |x| [in] and second moment H = X^T X / n [in, in] of one input group's
    calibration inputs (float32 on `device`).

    While fewer tokens than input columns have been seen, the token rows themselves are kept
    (X [n, in], n <= in) instead of H: every output error is then ||X D^T||^2 / n, which costs
    n x in x out per evaluation instead of in x in x out through H. With the small calibration
    sets used on CPU (e.g. 512 tokens against down_proj's 28672 inputs on a 70B layer) this is
    56x less arithmetic; memory never exceeds one [in, in] float32 matrix either way. Once more
    tokens arrive than there are columns, the rows are folded into H and H is kept."""

    def __init__(self, columns: int, device: str | torch.device = "cpu"):
        self.columns = columns
        self.device = device
        self.abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self._rows: list[torch.Tensor] | None = []
        self._h: torch.Tensor | None = None
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs [..., in] (every row a token position)."""
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        count = x.shape[0]
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if self._rows is not None and self.tokens + count <= self.columns:
            self._rows.append(x.clone() if x.data_ptr() == inputs.data_ptr() else x)
            self.tokens += count
            return
        if self._rows is not None:  # too many tokens for the row form: switch to H for good
            self._h = self._gram()
            self._rows = None
        self._h *= self.tokens / (self.tokens + count)
        self.tokens += count
        x = x / self.tokens**0.5
        self._h += x.T @ x

    def _factor(self) -> torch.Tensor:
        """F [n, in] with F^T F = H (the kept rows / sqrt(n)); only in the row form."""
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, self.columns, device=self.device)
        return rows / max(self.tokens, 1) ** 0.5

    def _gram(self) -> torch.Tensor:
        f = self._factor()
        return f.T @ f

    @property
    def h(self) -> torch.Tensor:
        """H = X^T X / n, float32 [in, in] (built from the kept rows when in the row form)."""
        return self._h if self._h is not None else self._gram()

    def output_error(self, diff: torch.Tensor) -> float:
        """||X D^T||^2 / n for a weight difference D [out, in], by the cheaper of the two forms."""
        if self._h is not None:
            return output_error(diff, self._h)
        f = self._factor().to(diff.dtype)
        total = 0.0
        for start in range(0, diff.shape[0], ROW_CHUNK):
            total += float((diff[start : start + ROW_CHUNK] @ f.T).square().sum())
        return total

    def diagonal_blocks(self, group: int) -> torch.Tensor:
        """The diagonal [group, group] blocks of H, float32 [in / group, group, group]."""
        if self._h is not None:
            return torch.stack([self._h[i : i + group, i : i + group] for i in range(0, self.columns, group)])
        f = self._factor().reshape(-1, self.columns // group, group)  # [n, groups, g]
        return torch.einsum("ngi,ngj->gij", f, f)

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean |x|, float32 [in]."""
        return (self.abs_sum / max(self.tokens, 1)).float()


# -- group-wise round-to-nearest ---------------------------------------------------------------
@dataclass
class AWQCodes:
    """Integer codes and group parameters of one linear [out, in] (unpacked; formats/ pack them)."""

    q: torch.Tensor  # int32 [out, in] in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [out, groups], values exactly representable in the scale dtype
    zeros: torch.Tensor  # int32 [out, groups] (2^(bits-1) everywhere for symmetric codes)
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """W = (q - zero) x scale per group, float32 [out, in]."""
        zeros = self.zeros.repeat_interleave(self.group_size, dim=1)
        return (self.q - zeros).float() * self.scales.repeat_interleave(self.group_size, dim=1)

    def signed(self) -> torch.Tensor:
        """Symmetric codes as signed integers q - 2^(bits-1), int32 [out, in] (compressed-tensors)."""
        return self.q - self.zeros.repeat_interleave(self.group_size, dim=1)


def _group_params(wg: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) float32 [..., groups] of grouped weights wg [..., groups, group_size]."""
    maxq = 2**config.bits - 1
    if config.zero_point:
        high, low = wg.amax(-1), wg.amin(-1)
        scales = ((high - low).clamp(min=1e-5) / maxq).to(config.dtype).float()
        zeros = torch.round(-low / scales).clamp(0, maxq)
    else:
        scales = (wg.abs().amax(-1).clamp(min=1e-5) / (2 ** (config.bits - 1) - 1)).to(config.dtype).float()
        zeros = torch.full_like(scales, 2 ** (config.bits - 1))
    return scales, zeros


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"{cols} input columns are not a multiple of the group size {group}")
    return w.reshape(rows, cols // group, group)


def quantize(weight: torch.Tensor, config: AWQConfig) -> AWQCodes:
    """Group-wise round-to-nearest of W [out, in] (any float dtype) with AutoAWQ's semantics."""
    wg = _grouped(weight.float(), config.group_size)
    scales, zeros = _group_params(wg, config)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 2**config.bits - 1)
    return AWQCodes(q.reshape(weight.shape).to(torch.int32), scales, zeros.to(torch.int32), config.group_size)


def fake_quantize(weight: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Q(W): the dequantized round-to-nearest weight, float32 [out, in] (for the searches)."""
    wg = _grouped(weight.float(), config.group_size)
    scales, zeros = _group_params(wg, config)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 2**config.bits - 1)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(weight.shape)


# -- output error through the second moment ------------------------------------------------------
def output_error(diff: torch.Tensor, h: torch.Tensor | InputStats) -> float:
    """||X D^T||^2 / n = sum((D H) * D) for a weight difference D [out, in] and H = X^T X / n
    (or `InputStats`, which picks the cheaper form)."""
    if isinstance(h, InputStats):
        return h.output_error(diff)
    total = 0.0
    for start in range(0, diff.shape[0], ROW_CHUNK):
        d = diff[start : start + ROW_CHUNK]
        total += float(((d @ h) * d).sum())
    return total


def normalized_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha (at least 1e-4), divided by sqrt(max s x min s) (AutoAWQ's normalisation)."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    """The result of `search_scales`: the best `scales` (in the fold's space, see `expand`),
    its `alpha`, the group's output error with them (`loss`) and with alpha 0 (`rtn_loss`)."""

    scales: torch.Tensor
    alpha: float
    loss: float
    rtn_loss: float


def search_scales(weights: Sequence[torch.Tensor], h: torch.Tensor | InputStats, x_mean: torch.Tensor, config: AWQConfig,
                  expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScaleSearch:
    """Grid search of the group's input scales (Lin et al. 2023, §3.2, eq. 5).

    weights: the group's linears [out_k, in] (float32, on H's device); h: the group's input
    second moment [in, in] or its `InputStats`; x_mean: mean |x| per channel of the fold's space (what one scale
    applies to: [in], or fewer channels when `expand` maps them onto the inputs, e.g. one scale
    per v_proj row repeated over the query heads sharing it under GQA). Returns the scales in
    the fold's space: the inputs are divided by expand(s), the linears' columns multiplied."""
    expand = expand or (lambda s: s)

    def loss_of(s: torch.Tensor) -> float:
        s_in = expand(s)
        return sum(output_error(w - fake_quantize(w * s_in, config) / s_in, h) for w in weights)

    return best_scales(x_mean, config, loss_of)


def best_scales(x_mean: torch.Tensor, config: AWQConfig, loss_of: Callable[[torch.Tensor], float]) -> ScaleSearch:
    """The grid of AWQ's scale search: s = normalized_scales(x_mean, alpha) for alpha = step / n_grid,
    step 0 .. n_grid - 1 (alpha 0: plain round-to-nearest, its loss kept as rtn_loss), and the one
    with the least `loss_of(s)` (the first on ties)."""
    best: ScaleSearch | None = None
    rtn_loss = 0.0
    for step in range(config.n_grid):
        alpha = step / config.n_grid
        s = normalized_scales(x_mean, alpha)
        loss = loss_of(s)
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best.loss:
            best = ScaleSearch(s, alpha, loss, rtn_loss)
    best.rtn_loss = rtn_loss
    return best


def search_clip(weight: torch.Tensor, h: torch.Tensor | InputStats, config: AWQConfig) -> torch.Tensor:
    """Per output row and input group, the clipping bound max |w| x (1 - i / clip_grid) (i below
    max_shrink x clip_grid) with the least error of that group's partial output x_g . w_g
    (its diagonal block of H). Returns the bounds, float32 [out, groups]."""
    group = config.group_size
    rows, cols = weight.shape
    if isinstance(h, InputStats):
        blocks = h.diagonal_blocks(group)  # [groups, g, g]
    else:
        blocks = torch.stack([h[i : i + group, i : i + group] for i in range(0, cols, group)])
    bounds = torch.empty(rows, cols // group, device=weight.device)
    for start in range(0, rows, ROW_CHUNK):
        wg = _grouped(weight[start : start + ROW_CHUNK].float(), group)
        original = wg.abs().amax(-1)
        best_err = torch.full_like(original, float("inf"))
        best = original.clone()
        for step in range(max(1, int(config.max_shrink * config.clip_grid))):
            bound = original * (1 - step / config.clip_grid)
            clipped = torch.maximum(torch.minimum(wg, bound[..., None]), -bound[..., None])
            d = wg - fake_quantize(clipped.reshape(-1, cols), config).reshape(wg.shape)
            err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, bound, best)
        bounds[start : start + ROW_CHUNK] = best
    return bounds


def apply_clip(weight: torch.Tensor, bounds: torch.Tensor, group: int) -> torch.Tensor:
    """W clamped to [-bound, bound] per row and input group, float32 [out, in]."""
    wg = _grouped(weight.float(), group)
    return torch.maximum(torch.minimum(wg, bounds[..., None]), -bounds[..., None]).reshape(weight.shape)
