"""AWQ (Lin et al. 2023) plugged into the calibrated pipeline as a `Quantizer` (the math is in
calibrate/awq.py).

Per decoder layer, still in float32 (`prepare_layer`), for each input group of the dialect
record in execution order: gather the group's input statistics on the layer's forward (mean
|x| and X^T X / n), search its scales s, and fold them: the group's linears' columns x s, the
module that produces the input (`InputGroup.after`) / s: a norm's weight, or the rows (and
bias) of the preceding linear. Under grouped-query attention the o_proj input columns are v_proj
rows repeated over the query heads of each KV head: the scales are tied across those heads
(one per v_proj row) so the fold stays exact. Where `after` is a fused tensor
(`InputGroup.after_rows`: InternLM2 wqkv -> wo, Phi-3 qkv_proj -> o_proj, both folding into
their v rows, and Phi-3 gate_up_proj -> down_proj, into its up half) only those rows (and
their bias) are divided. A group with no exact fold (`after` None, or shapes that do not tie)
keeps scale 1 and is named in the summary.

Then per group (`quantize_group`, true-sequential: the inputs come from the layer with the
previous groups already quantized): the clipping search on each linear (skipped for q/k
projections and fused qkv, whose errors the attention scores amplify, as AutoAWQ does), then
group-wise round-to-nearest, packed as AWQ gemm (formats/awq.py) or compressed-tensors
(symmetric only). Fused tensors (InternLM2 wqkv, w1/w3; Phi-3 qkv_proj, gate_up_proj) are
quantized as the fused tensors they are, under their original names.

A sparse layer (Qwen3-MoE; LayerWork.sparse): after the attention groups, `prepare_layer` searches
ONE scale vector for the post-attention norm -> router + every expert's gate/up on the block's
output error (calibrate/awq_experts.py), folds it (norm / s; router and gate/up columns x s, the
router stored in its own dtype and never quantized, so its logits stay), then per expert the
up -> down scales on the down inputs of the tokens routed to it (folded into that expert's up rows).
The pipeline then quantizes each expert on its routed tokens (calibrate/experts.py): clipping search
and round-to-nearest per expert linear. An expert that fewer than `expert_min_tokens` of the
calibration tokens reach (the share GPTQ uses, 0.5%) gets no up -> down scale search and plain
round-to-nearest (no clipping); the summary counts them.

`AWQJob` / `quantize_awq` are the one-call entry point of `quantize --method awq`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..formats import awq as awq_format
from ..formats import compressed_tensors
from ..io.safetensors_format import TensorSpec, torch_dtype
from ..models.dialects import FUSED_ROWS, Dialect, InputGroup, get_dialect, layer_dims
from ..models.layout import KeyInfo, Layout, build_layout
from ..models.views import open_view
from .awq import AWQCodes, AWQConfig, InputStats, apply_clip, quantize, search_clip, search_scales
from .awq_experts import collect_block_inputs, search_block_scales
from .experts import EXPERT_MIN_TOKENS, HESSIAN_SHARE, min_routed_tokens
from .outputs import CT_FORMAT, ct_quantization_config, ct_specs, group_count, kept_modules, scale_dtype_name
from .pipeline import QuantizeJob, quantize_calibrated
from .quantizer import GroupWork, LayerWork, ModuleUpdate, Quantizer

FORMATS = ("awq", CT_FORMAT)
NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "wqkv")  # linears whose outputs feed attention scores


@dataclass(frozen=True)
class Fold:
    """Where a group's scales go: `after` (a norm or a linear), and the maps between the fold's
    channels (the norm's weights, the linear's rows) and the group's input channels. `rows`:
    for a fused `after`, the indices (int64 [fold channels]) of its rows that make the input;
    None when every row does."""

    after: str
    norm: bool
    reduce: Callable[[torch.Tensor], torch.Tensor]  # per input channel -> per fold channel (a mean)
    expand: Callable[[torch.Tensor], torch.Tensor]  # per fold channel -> per input channel
    rows: torch.Tensor | None = None


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _gqa_maps(kv: int, rep: int, head_dim: int) -> tuple[Callable, Callable]:
    """o_proj input column (head h, dim d) reads v_proj row (h // rep, d)."""
    def reduce(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(kv, rep, head_dim).mean(1).reshape(-1)

    def expand(s: torch.Tensor) -> torch.Tensor:
        return s.reshape(kv, 1, head_dim).expand(kv, rep, head_dim).reshape(-1)

    return reduce, expand


class AWQQuantizer(Quantizer):
    """AWQ with scales folded into the preceding norm / linear; see the module docstring.

    `dialect`: the LLM's record (its groups name the norms and biases the folds rewrite).
    `fmt` "awq" (gemm tensors, fp16 scales) or "compressed-tensors" (pack-quantized, symmetric,
    scales in the model's dtype). `head_dim` (from the LLM config) lets the v -> o fold tie
    its scales under grouped-query attention; without it such a group keeps scale 1.
    `expert_min_tokens`: a sparse layer's experts reached by fewer than this share of the
    calibration tokens get round-to-nearest (GPTQ's threshold).
    `summary()`: {"linears", "groups_scaled", "unscaled": {module: reason}, "clipped",
    "mean_alpha", "error_vs_rtn"} so far and, for a sparse LLM, "experts": {"awq": experts (of all
    layers) with AWQ on their routed tokens, "round_to_nearest": experts below the token threshold,
    and which, "min_tokens_share", "fewest_tokens", "up_down_scaled": experts whose up -> down was
    scaled, "blocks_scaled": sparse blocks whose shared gate/up scales were searched}."""

    name = "awq"
    supports_experts = True
    DEFAULT_EXPERT_MIN_TOKENS = EXPERT_MIN_TOKENS

    def __init__(self, config: AWQConfig, dialect: Dialect, fmt: str = "awq", head_dim: int | None = None,
                 expert_min_tokens: float = DEFAULT_EXPERT_MIN_TOKENS):
        if fmt not in FORMATS:
            raise ValueError(f"AWQ writes {' or '.join(FORMATS)}, not {fmt!r}")
        if fmt == CT_FORMAT and config.zero_point:
            raise InputError("--format compressed-tensors stores symmetric weights (what vLLM serves by default); "
                             "use --no-zero-point, or --format awq for zero points")
        if config.bits != awq_format.BITS:
            raise InputError(f"AWQ writes {awq_format.BITS}-bit weights (the gemm version packs 8 nibbles per int32); "
                             f"--bits {config.bits} is not supported")
        if config.group_size <= 0:
            raise InputError(f"AWQ quantizes in groups of input features; --group-size {config.group_size} is not supported")
        self.config, self.dialect, self.fmt, self.head_dim = config, dialect, fmt, head_dim
        self._folded = {g.after for g in dialect.groups if g.after is not None}
        # a sparse layer: the MLP norm (the second of `norms`) and the router take the block's scales
        self._block_norm = list(dialect.norms)[1] if dialect.experts is not None else None
        if dialect.experts is not None:
            self._folded |= {self._block_norm, dialect.experts.router}
        self.expert_min_tokens = expert_min_tokens
        self._dtypes: dict[tuple[str, str], torch.dtype] = {}  # (module, param) -> stored dtype
        self._pending: dict[InputGroup, InputStats] = {}  # several at once for a chunk of experts
        self._experts: dict[str, set[str]] = {"awq": set(), "round_to_nearest": set()}  # "layer N mlp.experts.E"
        self._fewest_tokens: int | None = None
        self._up_down = self._blocks = 0
        self._linears = self._clipped = self._scaled = 0
        self._unscaled: dict[str, str] = {}
        self._alphas: list[float] = []
        self._ratios: list[float] = []

    # -- the plan ------------------------------------------------------------------------
    def options(self) -> dict:
        """The AWQConfig, the format and head_dim (and an expert threshold other than the default: a
        resumed run must match them)."""
        return ({**asdict(self.config), "format": self.fmt, "head_dim": self.head_dim}
                | ({"expert_min_tokens": self.expert_min_tokens} if self.expert_min_tokens != self.DEFAULT_EXPERT_MIN_TOKENS else {}))

    def output_specs(self, spec: TensorSpec, info: KeyInfo) -> list[TensorSpec] | None:
        """A linear's weight becomes qweight / qzeros / scales (AWQ) or weight_packed /
        weight_scale / weight_shape (compressed-tensors); the weight of a norm and the bias of a
        linear that a group's scales fold into are rewritten; the rest is copied.

        InputError naming the linear when its input width is not a multiple of the group size,
        or (AWQ) its output width not a multiple of 8."""
        self._dtypes[(info.module, info.param)] = torch_dtype(spec.dtype)
        if info.is_linear and info.param == "weight":
            if self.fmt == CT_FORMAT:
                if self.config.scale_dtype != scale_dtype_name(spec):
                    self.config = replace(self.config, scale_dtype=scale_dtype_name(spec))
                return ct_specs(spec, self.config.bits, self.config.group_size)
            return self._awq_specs(spec)
        if info.module in self._folded and info.param in ("weight", "bias"):
            return [spec]  # a norm's weight, the bias of a linear the scales fold into, a sparse layer's router
        return None

    def _awq_specs(self, spec: TensorSpec) -> list[TensorSpec]:
        rows, cols = spec.shape
        groups = group_count(spec, self.config.group_size, what="AWQ")
        if rows % 8:
            raise InputError(f"{spec.name}: its {rows} output features do not pack into AWQ words "
                             "(the gemm version packs 8 output columns per int32)")
        stem = spec.name.removesuffix(".weight")
        return [TensorSpec(f"{stem}.qweight", "I32", (cols, rows // 8)), TensorSpec(f"{stem}.qzeros", "I32", (groups, rows // 8)),
                TensorSpec(f"{stem}.scales", "F16", (groups, rows))]

    def quantization_config(self, layout: Layout) -> dict:
        """AWQ gemm (top level; modules_to_not_convert: vision tower, projector, head, and a sparse
        LLM's routers one by one, `...layers.N.mlp.gate`, as bitsandbytes' skip list names them:
        transformers and vLLM skip a module by name, and build the router as a linear) or
        compressed-tensors W4A16 symmetric per group (ignore rules for the same modules, the
        routers as one rule `re:.*\\.mlp\\.gate$`)."""
        if self.fmt == CT_FORMAT:
            return ct_quantization_config(layout, self.config.bits, self.config.group_size)
        routers = []
        if layout.record.experts is not None:
            routers = [info.key.removesuffix(f".{info.param}") for info in layout.keys.values()
                       if info.family == "llm" and info.module == layout.record.experts.router and info.param == "weight"]
        return awq_format.quantization_config(kept_modules(layout) + routers, "original", group_size=self.config.group_size)

    # -- scales, folded before any linear of the layer is quantized ----------------------
    def _fold(self, work: LayerWork, group: InputGroup) -> tuple[Fold | None, str]:
        """How the group's scales fold into `group.after`, or (None, why not)."""
        if group.after is None:
            return None, "no exact fold: the rows that produce its input are part of a fused tensor"
        width = work.weight(group.linears[0]).shape[1]
        if group.after in work.dialect.norms:
            return Fold(group.after, True, _same, _same), ""
        rows, hd, index = work.weight(group.after).shape[0], self.head_dim, None
        if group.after_rows is not None:
            if not hd:
                return None, f"no exact fold: which rows of the fused {group.after} make the input needs head_dim"
            spans = FUSED_ROWS[group.after_rows](rows, width, hd)
            index = torch.cat([torch.arange(start, stop) for start, stop in spans]).to(work.device)
            rows = len(index)
        if rows == width:
            return Fold(group.after, False, _same, _same, index), ""
        v_rows = group.after.endswith("v_proj") or group.after_rows in ("internlm2_wqkv_v", "qkv_v")
        if v_rows and hd and rows % hd == 0 and width % hd == 0 and (width // hd) % (rows // hd) == 0:
            kv = rows // hd
            return Fold(group.after, False, *_gqa_maps(kv, width // hd // kv, hd), index), ""
        return None, f"no exact fold: {group.after} has {rows} output rows for {width} input features"

    def _stored(self, module: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._dtypes.get((module, param), torch.float32)).cpu()

    def prepare_layer(self, work: LayerWork) -> Iterator[tuple[str, ModuleUpdate]]:
        """For each group: statistics on the float layer, scale search, fold (see the module
        docstring). Yields the folds one group at a time, so the next group's inputs come from
        the already-folded layer; norms and biases it plans are always written."""
        for group in work.dialect.groups:
            fold, why = self._fold(work, group)
            label = ", ".join(group.linears)
            if fold is None:
                self._unscaled[label] = why
                yield from self._unchanged_after(work, group)
                continue
            stats = InputStats(work.weight(group.linears[0]).shape[1], work.device)
            for inputs in work.inputs(group.hook):
                stats.add(inputs)
            weights = [work.weight(name) for name in group.linears]
            found = search_scales(weights, stats, fold.reduce(stats.mean_abs()), self.config, fold.expand)
            del stats
            self._scaled += 1
            self._alphas.append(found.alpha)
            ratio = found.loss / found.rtn_loss if found.rtn_loss > 0 else 1.0
            self._ratios.append(ratio)
            work.log(f"layer {work.index} {label}: alpha {found.alpha:.2f}, output error {ratio:.3f} x round-to-nearest's")
            s, s_in = found.scales, fold.expand(found.scales)
            yield from self._fold_into_after(work, fold, s)
            for name, weight in zip(group.linears, weights):
                yield name, ModuleUpdate({}, weight * s_in)
            del weights
        if work.sparse is not None:
            yield from self._prepare_sparse(work)

    def _prepare_sparse(self, work: LayerWork) -> Iterator[tuple[str, ModuleUpdate]]:
        """A sparse block (module docstring): the shared scales of the MLP norm -> router + every
        expert's gate/up, searched on the block's output and folded; then each expert's up -> down
        scales on its routed tokens (none for an expert below the token threshold)."""
        sparse = work.sparse
        experts, count = sparse.experts, sparse.settings["experts"]
        router = work.weight(experts.router)  # [experts, hidden]
        width = router.shape[1]
        cap = max(1, sparse.budget // HESSIAN_SHARE // (4 * width * 3))  # the rows, the block's output and its target
        seen = collect_block_inputs(work.inputs(experts.block), lambda rows: sparse.route(rows, router)[0], count, cap)
        x = seen.rows
        chosen, weights = sparse.route(x, router)
        groups = [experts.expert_groups(e) for e in range(count)]

        def expert_weights(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            first, second = groups[e][0].linears, groups[e][1].linears
            return work.weight(first[0]), work.weight(first[1]), work.weight(second[0])

        found = search_block_scales(x, chosen, weights, count, expert_weights, sparse.act, seen.mean_abs, self.config)
        ratio = found.loss / found.rtn_loss if found.rtn_loss > 0 else 1.0
        self._scaled += 1
        self._blocks += 1
        self._alphas.append(found.alpha)
        self._ratios.append(ratio)
        sample = f" (an even 1 in {seen.stride} of the {seen.tokens} tokens)" if seen.stride > 1 else ""
        work.log(f"layer {work.index} {self._block_norm} -> {experts.router}, experts' gate/up: alpha {found.alpha:.2f}, "
                 f"block output error {ratio:.3f} x round-to-nearest's{sample}")
        s = found.scales
        yield from self._fold_into_after(work, Fold(self._block_norm, True, _same, _same), s)
        stored = self._stored(experts.router, "weight", router * s)  # never quantized: its logits stay
        yield experts.router, ModuleUpdate({"weight": stored}, stored.float().to(work.device))
        for e in range(count):
            for name in groups[e][0].linears:
                yield name, ModuleUpdate({}, work.weight(name) * s)
        # per expert: up -> down, on the down inputs of its routed tokens (the block's input is x / s now)
        threshold = min_routed_tokens(self.expert_min_tokens, seen.tokens)
        x = x / s
        for e in range(count):
            rows = (chosen == e).any(dim=-1)
            if int(seen.routed[e]) < threshold or not rows.any():
                continue  # too few tokens: scale 1 (and round-to-nearest, in quantize_group)
            (gate_name, up_name), (down_name,) = groups[e][0].linears, groups[e][1].linears  # up: act(gate) * up's factor
            xe = x[rows]
            up, down = work.weight(up_name), work.weight(down_name)
            stats = InputStats(down.shape[1], work.device)
            stats.add(sparse.act(xe @ work.weight(gate_name).T) * (xe @ up.T))
            found = search_scales([down], stats, stats.mean_abs(), self.config)
            del stats
            self._up_down += 1
            self._scaled += 1
            self._alphas.append(found.alpha)
            self._ratios.append(found.loss / found.rtn_loss if found.rtn_loss > 0 else 1.0)
            yield up_name, ModuleUpdate({}, up / found.scales[:, None])
            yield down_name, ModuleUpdate({}, down * found.scales)

    def _fold_into_after(self, work: LayerWork, fold: Fold, s: torch.Tensor) -> Iterator[tuple[str, ModuleUpdate]]:
        weight = work.weight(fold.after)
        if fold.norm:
            stored = self._stored(fold.after, "weight", weight / s)
            yield fold.after, ModuleUpdate({"weight": stored}, stored.float().to(work.device))
            return
        bias = work.bias(fold.after)
        if fold.rows is None:
            new_weight, new_bias = weight / s[:, None], None if bias is None else bias / s
        else:  # only the rows of the fused tensor that make the group's input
            new_weight = weight.clone()
            new_weight[fold.rows] /= s[:, None]
            new_bias = None if bias is None else bias.clone()
            if new_bias is not None:
                new_bias[fold.rows] /= s
        tensors = {} if new_bias is None else {"bias": self._stored(fold.after, "bias", new_bias)}
        yield fold.after, ModuleUpdate(tensors, new_weight,
                                       None if new_bias is None else tensors["bias"].float().to(work.device))

    def _unchanged_after(self, work: LayerWork, group: InputGroup) -> Iterator[tuple[str, ModuleUpdate]]:
        """The planned norm weight / linear bias of a group left unscaled, written as they are."""
        if group.after is None:
            return
        if group.after in work.dialect.norms:
            yield group.after, ModuleUpdate({"weight": self._stored(group.after, "weight", work.weight(group.after))}, None)
            return
        bias = work.bias(group.after)
        if bias is not None:
            yield group.after, ModuleUpdate({"bias": self._stored(group.after, "bias", bias)}, None)

    # -- clipping and round-to-nearest, group by group ------------------------------------
    def _clips(self, name: str) -> bool:
        return self.config.clip and name.rpartition(".")[2] not in NO_CLIP

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        """Add one sample's group input to the statistics of the clipping search (when one of
        the group's linears is clipped); one set per group (a chunk of experts at once)."""
        if not any(self._clips(name) for name in group.linears):
            return
        if group not in self._pending:
            self._pending[group] = InputStats(inputs.shape[-1], inputs.device)
        self._pending[group].add(inputs)

    def quantize_group(self, work: GroupWork) -> Iterator[tuple[str, ModuleUpdate]]:
        """Clip (search on the observed inputs) and quantize each linear of the group; yields
        (linear, update) one linear at a time."""
        group, layer = work.group, work.layer
        stats = self._pending.pop(group, None)
        rtn = False
        if work.tokens is not None:  # one routed expert's group
            rtn = work.tokens < min_routed_tokens(self.expert_min_tokens, work.calibration_tokens)
            expert = f"layer {layer.index} {group.linears[0].rsplit('.', 1)[0]}"
            self._experts["round_to_nearest" if rtn else "awq"].add(expert)
            self._fewest_tokens = work.tokens if self._fewest_tokens is None else min(self._fewest_tokens, work.tokens)
            if rtn:
                layer.log(f"layer {layer.index} {', '.join(group.linears)}: {work.tokens} of {work.calibration_tokens} "
                          f"calibration tokens routed to it (fewer than {self.expert_min_tokens:.1%}); round-to-nearest")
                stats = None
        for name in group.linears:
            weight = layer.weight(name).float()
            if self._clips(name) and stats is not None:
                weight = apply_clip(weight, search_clip(weight, stats, self.config), self.config.group_size)
                self._clipped += 1
            codes = quantize(weight, self.config)
            del weight
            self._linears += 1
            update = ModuleUpdate(self._pack(codes), codes.dequantize().to(layer.device))
            del codes
            yield name, update
            del update

    def _pack(self, codes: AWQCodes) -> dict[str, torch.Tensor]:
        codes = AWQCodes(codes.q.cpu(), codes.scales.cpu(), codes.zeros.cpu(), codes.group_size)
        if self.fmt == CT_FORMAT:
            return compressed_tensors.pack_codes(codes.signed(), codes.scales, self.config.bits, self.config.dtype)
        return awq_format.pack(codes.q, codes.scales.T.contiguous(), codes.zeros.T.contiguous())

    _STATE = ("_fewest_tokens", "_up_down", "_blocks", "_linears", "_clipped", "_scaled", "_unscaled", "_alphas", "_ratios")

    def summary(self) -> dict:
        """Counts so far: linears quantized, groups scaled / unscaled (with the reason), linears
        clipped, the mean alpha, and the scaled groups' mean output error relative to RTN's."""
        facts = {"linears": self._linears, "groups_scaled": self._scaled, "unscaled": dict(self._unscaled),
                 "clipped": self._clipped, "mean_alpha": round(sum(self._alphas) / len(self._alphas), 3) if self._alphas else None,
                 "error_vs_rtn": round(sum(self._ratios) / len(self._ratios), 4) if self._ratios else None}
        if self._experts["awq"] or self._experts["round_to_nearest"] or self._blocks:
            facts["experts"] = {"awq": len(self._experts["awq"] - self._experts["round_to_nearest"]),
                                "round_to_nearest": len(self._experts["round_to_nearest"]),
                                "round_to_nearest_experts": sorted(self._experts["round_to_nearest"]),
                                "min_tokens_share": self.expert_min_tokens, "fewest_tokens": self._fewest_tokens,
                                "up_down_scaled": self._up_down, "blocks_scaled": self._blocks}
        return facts


@dataclass(frozen=True)
class AWQJob(QuantizeJob):
    """Everything that defines an AWQ run (pipeline.QuantizeJob with the AWQ scheme)."""

    config: AWQConfig
    fmt: str = "awq"


def llm_facts(source: Path) -> tuple[Dialect | None, int | None]:
    """(dialect record, head_dim) of a checkpoint's LLM as the pipeline will see it (either
    layout); (None, None) for an already-quantized input, which the pipeline then refuses."""
    with open_view(source, native_dialect=True) as view:
        config = view.config()
        if config.get("quantization_config"):
            return None, None
        dialect = build_layout(config, view.specs()).record
    return dialect, int(layer_dims(config["llm_config"])["head_dim"])


def quantize_awq(source: Path, out: Path, job: AWQJob, *, max_shard_size: int, overwrite: bool = False, resume: bool = False,
                 progress: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda _m: None,
                 quantizer: AWQQuantizer | None = None) -> Path:
    """Run AWQ over every decoder layer of a checkpoint (either layout) and write OUT in its layout
    (calibrate.pipeline.quantize_calibrated with an AWQQuantizer; same errors). Pass `quantizer`
    to read its summary afterwards."""
    if quantizer is None:
        dialect, head_dim = llm_facts(source)
        quantizer = AWQQuantizer(job.config, dialect or get_dialect("llama"), job.fmt, head_dim)
    return quantize_calibrated(source, out, quantizer, job.calibration(), max_shard_size=max_shard_size,
                               overwrite=overwrite, resume=resume, progress=progress, log=log)
