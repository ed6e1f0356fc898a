"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323): pure math, no I/O, no pipeline.

For a linear layer W [out, in] with inputs X, GPTQ quantizes W column by column, each time
spreading the column's rounding error over the not-yet-quantized columns through the inverse
Hessian H^-1 of the layer's squared error (H = 2 X^T X / n): dampening, a Cholesky-based
inverse, blocks of columns with lazy batch updates, group-wise scales and zeros, and optional
act-order (columns in order of decreasing H diagonal) or group-aware reordering (GAR).

A Hessian whose Cholesky fails (not numerically positive definite: non-finite or degenerate
inputs) is retried with 10x the dampening up to `MAX_DAMP`, then `prepare_hessian` raises
`HessianNotPositiveDefinite`; the caller (calibrate/gptq_quantizer.py) falls back to
round-to-nearest (`rtn_quantize`) for the linears that share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTQConfig:
    """The GPTQ scheme: `bits` per weight (2..8, 32 divisible by it for packing), `group_size`
    input columns per scale/zero (-1: one group per row), `sym` symmetric (zero fixed at
    2^(bits-1)) or asymmetric, `desc_act` act-order, `damp` the dampening as a fraction of the
    mean Hessian diagonal, `block_size` columns per lazy batch update, `act_group_aware` GAR,
    `scale_dtype` the dtype the checkpoint stores scales in (fp16 for GPTQ v1; the model's dtype
    for compressed-tensors): scales are rounded to it before the codes are computed."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_group_aware: bool = True  # GAR: groups (and columns inside them) by importance; static g_idx
    scale_dtype: str = "float16"


@dataclass
class GPTQResult:
    """Integer weights and their group parameters (unpacked; formats/gptq.py packs them)."""

    q: torch.Tensor  # int32 [out, in], values in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [groups, out]
    zeros: torch.Tensor  # int32 [groups, out]
    g_idx: torch.Tensor  # int32 [in]: the group of each input column
    loss: float  # sum of the GPTQ objective over columns
    row_loss: torch.Tensor | None = None  # float32 [out]: each row's share of `loss` (rows are independent given H)

    def dequantize(self) -> torch.Tensor:
        """W ~ scale x (q - zero), float32 [out, in]."""
        g = self.g_idx.long()
        return (self.q - self.zeros[g].T).float() * self.scales[g].T


class HessianAccumulator:
    """Running H = 2 X^T X / n (float32 [in, in] on `device`) over the calibration inputs of
    one linear (or of the linears that share an input); Frantar et al. 2022, eq. (2)."""

    def __init__(self, columns: int, device: str | torch.device = "cpu"):
        self.h = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    def take(self) -> torch.Tensor:
        """Hand the Hessian over, float32 [in, in] (the accumulator keeps no reference; a
        second take returns None)."""
        h, self.h = self.h, None
        return h

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs [..., in] of any float dtype (every row a sample position;
        computed in float32 on the accumulator's device, where `inputs` must already be)."""
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        count = x.shape[0]
        self.h *= self.samples / (self.samples + count)
        self.samples += count
        x = x * (2 / self.samples) ** 0.5
        self.h += x.T @ x


def group_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero, both float32 [out], for a block of columns w [out, k] (the range
    always includes 0; the scale is rounded to the `scale_dtype` value the checkpoint stores; an
    all-zero row gets the range [-1, 1])."""
    maxq = 2**bits - 1
    zero_t = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = ((xmax - xmin) / maxq).to(getattr(torch, scale_dtype)).float()  # the value the checkpoint will store
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_column(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes round(x / scale) + zero clamped to [0, 2^bits - 1], as float32 (shapes broadcast)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


MAX_DAMP = 1.0  # the top of the dampening ladder: H + mean(diag H) x I


class HessianNotPositiveDefinite(ArithmeticError):
    """The dampened Hessian's Cholesky failed even at MAX_DAMP (non-finite or degenerate inputs)."""


@dataclass
class PreparedHessian:
    """What GPTQ needs from a Hessian: the column order `perm` (int64 [in]), `hinv` the upper
    Cholesky factor of the dampened inverse (float32 [in, in], in `perm` order), `dead` (bool [in]:
    columns no input ever reached) and the dampening actually used (`damp`, a fraction of the
    mean diagonal; above the configured one when the Cholesky needed more). Linears that read
    the same input share one."""

    perm: torch.Tensor
    hinv: torch.Tensor
    dead: torch.Tensor
    damp: float = 0.0


def prepare_hessian(h: torch.Tensor, config: GPTQConfig, max_damp: float = MAX_DAMP) -> PreparedHessian:
    """Order columns (act-order / GAR), dampen, and invert H float32 [in, in] (Frantar et al. 2022, §4 step 3).

    `hinv` is the upper Cholesky factor U of H^-1 (H^-1 = U^T U), computed as the inverse of the
    upper triangular factor of H = V V^T: that V is the Cholesky factor of H with rows and columns
    reversed (J H J = R R^T, V = J R J), and H^-1 = V^-T V^-1 makes V^-1 the upper factor of H^-1.
    One Cholesky and one triangular inverse (~2n^3/3 flops) instead of the reference
    implementation's Cholesky, cholesky_inverse and a second Cholesky (~4n^3/3): the same matrix
    to float32 rounding (tests/test_calibrate.py), half the time for the 28672-column down_proj
    of a Llama-3-70B layer.

    Consumes `h` (modified in place; no full-size copy kept: H can be 28672^2 floats, and at most
    two full-size matrices are alive at a time, plus n x 1024 floats). A failing Cholesky (or a
    non-finite inverse) is retried with 10x the dampening up to `max_damp` (the result records the
    damp used); raises HessianNotPositiveDefinite when even that fails."""
    cols = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    group = config.group_size if config.group_size > 0 else cols
    if config.desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
    elif config.act_group_aware and group < cols:
        perm = group_aware_order(torch.diag(h), group)
    else:
        perm = torch.arange(cols, device=h.device)
    # J H J: H in the reversed column order (the reversal folded into the act-order / GAR gather)
    reverse = perm.flip(0)
    h = h.index_select(0, reverse)
    h = h.index_select(1, reverse)
    diag = h.diagonal().clone()
    mean = torch.mean(diag)
    damp = config.damp
    while True:
        h.diagonal().copy_(diag + damp * mean)
        # R R^T = J H J in a copy (H itself is kept for a retry with more dampening)
        lower, info = torch.linalg.cholesky_ex(h)
        if _factored(lower, info):
            del h
            upper = lower.flip((0, 1))  # V = J R J: H = V V^T
            hinv = _upper_inverse(upper, out=lower)  # in R's storage
            if hinv is not None:
                return PreparedHessian(perm, hinv, dead, damp)
            # V^-1 overflowed: rebuild H = V V^T (dampened) in the same storage, then J H J
            rebuilt = torch.matmul(upper, upper.T, out=lower)
            del upper
            h = rebuilt.flip((0, 1))
            del rebuilt
        del lower
        if damp >= max_damp:
            raise HessianNotPositiveDefinite(f"the Cholesky factorization failed up to damp {damp:g} "
                                             f"(mean Hessian diagonal {float(mean):.4g})")
        damp = min(max(damp * 10, 0.01), max_damp)


def _upper_inverse(upper: torch.Tensor, out: torch.Tensor, block: int = 1024) -> torch.Tensor | None:
    """V^-1 of an upper triangular V float32 [n, n] with a positive diagonal, written into `out`
    (same shape, not sharing V's storage; returned), or None when it is not finite.

    Blocked like LAPACK's trtri (which torch does not expose), left to right over column blocks j:
    X_jj = V_jj^-1 (a small triangular solve), then X[:j, j] = -X[:j, :j] V[:j, j] X_jj with the
    products taken block row by block row over the nonzero (upper) part of X[:j, :j] only: ~n^3/3
    flops, and temporaries of n x `block` floats (no copy of a large submatrix)."""
    n = upper.shape[0]
    out.zero_()
    for start in range(0, n, block):
        stop = min(start + block, n)
        diagonal = upper[start:stop, start:stop].contiguous()
        eye = torch.eye(stop - start, dtype=upper.dtype, device=upper.device)
        inverse = torch.linalg.solve_triangular(diagonal, eye, upper=True)
        out[start:stop, start:stop] = inverse
        if start:
            right = upper[:start, start:stop] @ inverse  # V[:j, j] X_jj, [start, block]
            for row in range(0, start, block):
                end = min(row + block, start)
                out[row:end, start:stop] = -(out[row:end, row:start] @ right[row:start])
            del right
        del diagonal, eye, inverse
    return out if bool(torch.isfinite(out).all()) else None


def _factored(factor: torch.Tensor, info: torch.Tensor) -> bool:
    return int(info) == 0 and bool(torch.isfinite(factor.diagonal()).all())


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, config: GPTQConfig) -> GPTQResult:
    """Quantize W [out, in] (any float dtype, on H's device) given H float [in, in] (not modified)
    or a PreparedHessian; Frantar et al. 2022, Algorithm 1 with lazy batches of `block_size`
    columns. Returns integer codes and group parameters on the CPU. Raises
    HessianNotPositiveDefinite (from prepare_hessian) when given a raw H that cannot be inverted."""
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian.float().clone(), config)
    perm, hinv = prepared.perm, prepared.hinv
    w = weight.to(torch.float32, copy=True)
    rows, cols = w.shape
    w[:, prepared.dead] = 0
    w = w[:, perm]
    device = w.device
    group = config.group_size if config.group_size > 0 else cols
    n_groups = -(-cols // group)
    static = not config.desc_act  # groups stay the original column ranges (GAR only reorders)
    q = torch.zeros(rows, cols, dtype=torch.int32, device=device)
    scales = torch.zeros(n_groups, rows, device=device)
    zeros = torch.zeros(n_groups, rows, device=device)
    row_loss = torch.zeros(rows, device=device)
    scale = zero = None
    maxq = 2**config.bits - 1
    # each block is swept transposed ([columns, rows]: a column is a contiguous row), with the same
    # elementwise arithmetic as the reference implementation, so the codes are the same bit for bit
    for start in range(0, cols, config.block_size):
        stop = min(start + config.block_size, cols)
        w1 = w[:, start:stop].T.contiguous()
        codes1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        buffer = torch.empty_like(w1)
        hinv1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group == 0:
                # the group's range from W as of the last block update (as the reference implementation)
                scale, zero = group_params(w[:, column : column + group], config.bits, config.sym, config.scale_dtype)
                index = int(perm[column]) // group if static else column // group
                scales[index], zeros[index] = scale, zero
            x, codes = w1[i], codes1[i]
            torch.div(x, scale, out=codes).round_().add_(zero).clamp_(0, maxq)  # quantize_column, in place
            dequantized = torch.sub(codes, zero, out=buffer[0]).mul_(scale)
            e = torch.sub(x, dequantized, out=err1[i]).div_(hinv1[i, i])  # (x - dequantized) / d
            # the rank-1 update of the block's later columns, its product in a reused buffer (a fresh
            # [block - i, rows] temporary per column costs as much as the arithmetic)
            product = torch.mul(hinv1[i, i:].unsqueeze(1), e, out=buffer[: stop - start - i])
            w1[i:] -= product
        row_loss += err1.square().sum(dim=0)  # per row, sum over columns of (x - dequantized)^2 / d^2
        q[:, start:stop] = codes1.T.to(torch.int32)
        w[:, start:stop] = w1.T
        # the lazy batch update, accumulated in place (no [rows, cols - stop] temporary: 0.9 GiB for a
        # 70B down_proj); K = block_size is one GEMM accumulation, so it rounds as W - (E @ H^-1) does
        w[:, stop:].addmm_(err1.T.contiguous(), hinv[start:stop, stop:], alpha=-1)
    inverse = torch.argsort(perm)
    positions = torch.arange(cols, device=device)
    # act-order: a column's group is its position in quantization order; otherwise its own range
    g_idx = (positions // group).to(torch.int32)[inverse] if not static else (positions // group).to(torch.int32)
    row_loss = row_loss.cpu() / 2
    return GPTQResult(q[:, inverse].cpu(), scales.cpu(), zeros.to(torch.int32).cpu(), g_idx.cpu(), float(row_loss.sum()), row_loss)


def group_aware_order(diag: torch.Tensor, group: int) -> torch.Tensor:
    """GAR column order (int64 [in]) from the H diagonal `diag` [in]: whole groups by decreasing max importance, columns
    inside each group by decreasing importance; a partial last group stays last. Groups stay
    contiguous, so the stored g_idx is the plain static one."""
    cols = diag.numel()
    full = cols // group
    blocks = diag[: full * group].reshape(full, group)
    inner = torch.argsort(blocks, dim=1, descending=True, stable=True) + torch.arange(full, device=diag.device)[:, None] * group
    order = torch.argsort(blocks.max(dim=1).values, descending=True, stable=True)
    perm = inner[order].reshape(-1)
    if full * group < cols:
        tail = torch.argsort(diag[full * group :], descending=True, stable=True) + full * group
        perm = torch.cat([perm, tail])
    return perm


def rtn_quantize(weight: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """Round-to-nearest of W [out, in] (any float dtype; computed on the CPU) with the same static
    groups, scales and zeros as GPTQ: the baseline GPTQ must beat, and the fallback for a
    linear whose Hessian cannot be inverted. loss is 0 (no Hessian to measure it with)."""
    w = weight.float().cpu()
    rows, cols = w.shape
    group = config.group_size if config.group_size > 0 else cols
    n_groups = -(-cols // group)
    q = torch.zeros(rows, cols, dtype=torch.int32)
    scales, zeros = torch.zeros(n_groups, rows), torch.zeros(n_groups, rows)
    for g in range(n_groups):
        block = w[:, g * group : (g + 1) * group]
        scale, zero = group_params(block, config.bits, config.sym, config.scale_dtype)
        scales[g], zeros[g] = scale, zero
        q[:, g * group : (g + 1) * group] = quantize_column(block, scale.unsqueeze(1), zero.unsqueeze(1), config.bits).to(torch.int32)
    return GPTQResult(q, scales, zeros.to(torch.int32), (torch.arange(cols) // group).to(torch.int32), 0.0)
