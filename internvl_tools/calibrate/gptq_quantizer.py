"""GPTQ (Frantar et al. 2022) plugged into the calibrated pipeline as a `Quantizer`.

Per input group of a decoder layer: the observed inputs build one Hessian H = 2 X^T X / n
(shared by the group's linears, e.g. q/k/v), prepared once (order, dampening, inverse
Cholesky; calibrate/gptq.py), then each linear is quantized with it, packed in the GPTQ v1
checkpoint format (formats/gptq.py) and handed back with its dequantized weight, so the next
group sees the quantized layer's outputs (true-sequential).

A Hessian that stays singular up to the top of the dampening ladder (non-finite or degenerate
calibration inputs) does not stop the run: its linears are quantized with round-to-nearest
and a warning naming them goes to the log.

A sparse layer's routed experts (calibrate/experts.py) get one Hessian per expert group, built
from the calibration tokens routed to that expert. An expert that fewer than `expert_min_tokens`
of the calibration tokens reach (a share, 0.005 = 0.5%: GPTQModel's default `Fallback`, RTN below
0.5% of the calibration; at least one token) is quantized with round-to-nearest instead, as
GPTQModel does: a Hessian from a handful of tokens fits them, not the expert. The summary counts
them. The router is never quantized.

With `fmt="compressed-tensors"` the same codes are written as vLLM's pack-quantized W4A16 /
W8A16 (symmetric only, static groups that divide every input width, scales rounded to the
model's dtype, in which compressed-tensors stores and vLLM loads them).

`GPTQJob` / `quantize_gptq` are the one-call entry point of `quantize --method gptq`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..formats import compressed_tensors
from ..formats.gptq import GPTQSettings, pack, packed_shapes
from ..formats.gptq import quantization_config as gptq_quantization_config
from ..formats.rules import router_regex
from ..io.safetensors_format import TensorSpec
from ..models.dialects import InputGroup
from ..models.layout import KeyInfo, Layout
from .gptq import GPTQConfig, GPTQResult, HessianAccumulator, HessianNotPositiveDefinite, prepare_hessian, gptq_quantize, rtn_quantize
from .experts import EXPERT_MIN_TOKENS, min_routed_tokens
from .outputs import CT_FORMAT, ct_quantization_config, ct_specs, scale_dtype_name
from .pipeline import QuantizeJob, quantize_calibrated
from .quantizer import GroupWork, ModuleUpdate, Quantizer


class GPTQQuantizer(Quantizer):
    """GPTQ with one Hessian per input group; see the module docstring.

    `summary()` gives {"linears": count, "round_to_nearest": [linears that fell back],
    "damp_raised": {linears: damp used}} and, for a sparse LLM, "experts": {"gptq": experts (of all
    layers) calibrated with GPTQ, "round_to_nearest": experts below the token threshold, and which,
    "min_tokens_share", "fewest_tokens" routed to one expert}."""

    name = "gptq"
    supports_experts = True
    DEFAULT_EXPERT_MIN_TOKENS = EXPERT_MIN_TOKENS

    def __init__(self, config: GPTQConfig, fmt: str = "gptq", expert_min_tokens: float = DEFAULT_EXPERT_MIN_TOKENS):
        if fmt not in ("gptq", CT_FORMAT):
            raise ValueError(f"GPTQ writes gptq or {CT_FORMAT}, not {fmt!r}")
        if fmt == CT_FORMAT and not config.sym:
            raise InputError("--format compressed-tensors stores symmetric weights (what vLLM serves by default); "
                             "drop --asym, or use the GPTQ format for zero points")
        if fmt == CT_FORMAT and config.desc_act:
            raise InputError("--format compressed-tensors is written with static groups; drop --desc-act "
                             "(group-aware reordering, the default, keeps static groups)")
        self.config, self.fmt = config, fmt
        self.expert_min_tokens = expert_min_tokens
        self._pending: dict[InputGroup, HessianAccumulator] = {}  # several at once for a chunk of experts
        self._experts: dict[str, set[str]] = {"gptq": set(), "round_to_nearest": set()}  # "layer N mlp.experts.E"
        self._fewest_tokens: int | None = None
        self._linears = 0
        self._fallbacks: list[str] = []
        self._damped: dict[str, float] = {}

    def options(self) -> dict:
        """The GPTQConfig (and a format other than gptq, an expert threshold other than the default) as a
        dict (a resumed run must match it)."""
        return (asdict(self.config) | ({"format": self.fmt} if self.fmt != "gptq" else {})
                | ({"expert_min_tokens": self.expert_min_tokens} if self.expert_min_tokens != self.DEFAULT_EXPERT_MIN_TOKENS else {}))

    def output_specs(self, spec: TensorSpec, info: KeyInfo) -> list[TensorSpec] | None:
        """A linear's `weight` [out, in] becomes qweight / qzeros / scales / g_idx; the rest is copied.

        Raises InputError when `in` does not pack into 32-bit words of `bits`-bit values."""
        if not (info.is_linear and info.param == "weight"):
            return None
        rows, cols = spec.shape
        bits = self.config.bits
        if self.fmt == CT_FORMAT:
            if self.config.scale_dtype != scale_dtype_name(spec):
                self.config = replace(self.config, scale_dtype=scale_dtype_name(spec))
            return ct_specs(spec, bits, self.config.group_size)
        if cols % (32 // bits):
            raise InputError(f"{spec.name}: {cols} input features do not pack into 32-bit words of {bits}-bit values")
        stem = spec.name.removesuffix(".weight")
        return [TensorSpec(f"{stem}.{part}", dtype, shape)
                for part, (shape, dtype) in packed_shapes(rows, cols, bits, self.config.group_size).items()]

    def quantization_config(self, layout: Layout) -> dict:
        """GPTQ v1 quantization_config (formats/gptq.py): vision and mlp1 stay unquantized; or the
        compressed-tensors one with ignore rules for the vision tower, projector and head."""
        c = self.config
        if self.fmt == CT_FORMAT:
            return ct_quantization_config(layout, c.bits, c.group_size)
        return gptq_quantization_config(GPTQSettings(bits=c.bits, group_size=c.group_size, sym=c.sym, desc_act=c.desc_act, damp=c.damp),
                                        router=router_regex(layout.record))

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        """Add one sample's group input [1, T, in] to the group's Hessian (on the input's device)."""
        if group not in self._pending:
            self._pending[group] = HessianAccumulator(inputs.shape[-1], inputs.device)
        self._pending[group].add(inputs)

    def quantize_group(self, work: GroupWork) -> Iterator[tuple[str, ModuleUpdate]]:
        """GPTQ each linear of the group with the group's Hessian (round-to-nearest when it cannot
        be inverted, with a warning); yields (linear, update) one linear at a time so the pipeline
        puts each dequantized weight in place before the next is made.

        Raises RuntimeError when no input of the group was observed (a pipeline bug)."""
        group, layer = work.group, work.layer
        accumulator = self._pending.pop(group, None)
        where = f"layer {layer.index} {', '.join(group.linears)}"
        expert = f"layer {layer.index} {group.linears[0].rsplit('.', 1)[0]}"  # meaningful for an expert group only
        if work.tokens is not None and work.tokens < self._expert_threshold(work):
            prepared = None  # an expert (almost) no calibration token reaches
            self._experts["round_to_nearest"].add(expert)
            layer.log(f"{where}: {work.tokens} of {work.calibration_tokens} calibration tokens routed to it (fewer than "
                      f"{self.expert_min_tokens:.1%}); round-to-nearest")
        elif accumulator is None:
            raise RuntimeError(f"{where}: no calibration input was observed")
        else:
            prepared = self._prepare(accumulator, where, group, layer)
            if work.tokens is not None:
                self._experts["gptq"].add(expert)
        if work.tokens is not None:
            self._fewest_tokens = work.tokens if self._fewest_tokens is None else min(self._fewest_tokens, work.tokens)
        del accumulator
        # linears that share the Hessian (q/k/v, gate/up) are swept as one stacked matrix: GPTQ treats
        # rows independently given H, so the codes are each linear's own, bit for bit, and the
        # per-column loop runs once per group instead of once per linear
        stacked = self._stacked(layer, group.linears, prepared) if prepared is not None and len(group.linears) > 1 else {}
        for name in group.linears:
            if name in stacked:
                result = stacked.pop(name)
            else:
                weight = layer.weight(name)
                result = gptq_quantize(weight, prepared, self.config) if prepared is not None else rtn_quantize(weight, self.config)
                del weight
            self._linears += 1
            method = f"GPTQ loss {result.loss:.4g}" if prepared is not None else "round-to-nearest"
            layer.log(f"layer {layer.index} {name}: {method}")
            update = ModuleUpdate(self._pack(result), result.dequantize().to(layer.device))
            del result
            yield name, update
            del update  # the layer holds the weight now; keep no second reference while the next linear runs

    def _stacked(self, layer, names, prepared) -> dict[str, GPTQResult]:
        """GPTQ of the linears `names` (all reading the prepared Hessian's input) as one matrix of
        their stacked rows, split back into one GPTQResult per linear (its rows' codes, scales,
        zeros and loss)."""
        weights = [layer.weight(name) for name in names]
        bounds = [0]
        for weight in weights:
            bounds.append(bounds[-1] + weight.shape[0])
        whole = gptq_quantize(torch.cat(weights), prepared, self.config)
        del weights
        return {name: GPTQResult(whole.q[a:b], whole.scales[:, a:b].contiguous(), whole.zeros[:, a:b].contiguous(), whole.g_idx,
                                 float(whole.row_loss[a:b].sum()), whole.row_loss[a:b])
                for name, a, b in zip(names, bounds, bounds[1:])}

    def _expert_threshold(self, work: GroupWork) -> int:
        """The fewest routed tokens an expert needs for GPTQ: a share of the calibration tokens, at least 1."""
        return min_routed_tokens(self.expert_min_tokens, work.calibration_tokens)

    def _prepare(self, accumulator: HessianAccumulator, where: str, group: InputGroup, layer):
        """The prepared Hessian of a group, or None (round-to-nearest, logged) when it cannot be inverted."""
        try:
            prepared = prepare_hessian(accumulator.take(), self.config)  # consumes H; shared by the group's linears
        except HessianNotPositiveDefinite as err:
            prepared = None
            self._fallbacks += [f"layer {layer.index} {name}" for name in group.linears]
            layer.log(f"warning: {where}: GPTQ is impossible, {err} (non-finite or degenerate calibration inputs?); "
                      "quantized with round-to-nearest instead")
        if prepared is not None and prepared.damp != self.config.damp:
            self._damped.update({f"layer {layer.index} {name}": prepared.damp for name in group.linears})
            layer.log(f"warning: {where}: the Hessian needed damp {prepared.damp:g} (configured {self.config.damp:g})")
        return prepared

    def _pack(self, result: GPTQResult) -> dict[str, torch.Tensor]:
        if self.fmt != CT_FORMAT:
            return pack(result, self.config.bits)
        g = result.g_idx.long()
        signed = result.q - result.zeros[g].T  # symmetric: zero 2^(bits-1) everywhere
        return compressed_tensors.pack_codes(signed, result.scales.T.contiguous(), self.config.bits,
                                             getattr(torch, self.config.scale_dtype))

    _STATE = ("_fewest_tokens", "_linears", "_fallbacks", "_damped")

    def summary(self) -> dict:
        """{"linears": count, "round_to_nearest": [...], "damp_raised": {...}} so far; "experts" (expert groups
        quantized with GPTQ / with round-to-nearest for too few routed tokens) when there were any."""
        facts = {"linears": self._linears, "round_to_nearest": list(self._fallbacks), "damp_raised": dict(self._damped)}
        if self._experts["gptq"] or self._experts["round_to_nearest"]:
            facts["experts"] = {"gptq": len(self._experts["gptq"]), "round_to_nearest": len(self._experts["round_to_nearest"]),
                                "round_to_nearest_experts": sorted(self._experts["round_to_nearest"]),
                                "min_tokens_share": self.expert_min_tokens, "fewest_tokens": self._fewest_tokens}
        return facts


@dataclass(frozen=True)
class GPTQJob(QuantizeJob):
    """Everything that defines a GPTQ run (pipeline.QuantizeJob with the GPTQ scheme)."""

    config: GPTQConfig
    fmt: str = "gptq"


def quantize_gptq(source: Path, out: Path, job: GPTQJob, *, max_shard_size: int, overwrite: bool = False, resume: bool = False,
                  progress: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda _m: None,
                  quantizer: GPTQQuantizer | None = None) -> Path:
    """Run GPTQ over every decoder layer of an original-layout checkpoint and write OUT
    (calibrate.pipeline.quantize_calibrated with a GPTQQuantizer, `quantizer` when given, e.g. to
    read its summary afterwards; same errors)."""
    quantizer = quantizer or GPTQQuantizer(job.config, job.fmt)
    return quantize_calibrated(source, out, quantizer, job.calibration(), max_shard_size=max_shard_size,
                               overwrite=overwrite, resume=resume, progress=progress, log=log)
