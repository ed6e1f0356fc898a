"""`quantize --method int8`: a pre-quantized 8-bit checkpoint, streamed.

Every linear of the LLM's decoder layers becomes int8: in bitsandbytes' format (int8 weight +
row absmax SCB + weight_format), in compressed-tensors' W8A16 pack-quantized format
(weight_packed + per-channel weight_scale + weight_shape), or in compressed-tensors' W8A8
int-quantized format (int8 weight + per-channel weight_scale; activations int8 per token,
dynamic), the last two what vLLM serves; the vision tower,
mlp1, embeddings, norms and the head keep their dtype and bytes. Works on
the original layout (remote code / this project's runtime) and on the native layout written
by `convert --to hf` (plain transformers + bitsandbytes).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError, LayoutError
from ..formats import bnb_int8, compressed_tensors
from ..formats.registry import check
from ..formats.rules import router_regex, towers
from ..io.reader import CheckpointReader
from ..models.dialects import dialect_of_architecture, dialect_of_native_model_type
from ..models.layout import build_layout
from ..models.vision import NATIVE_LLM_PREFIX
from .stream import Output, run_transform

# a decoder layer's linears, a sparse layer's experts too ("mlp.experts.E.gate_proj"); never its router ("mlp.gate")
NATIVE_DECODER_LINEAR = re.compile(re.escape(NATIVE_LLM_PREFIX) + r"\.layers\.\d+\.(?:self_attn|mlp)(?:\.experts\.\d+)?\.[a-z_]+_proj\.weight")


@dataclass(frozen=True)
class Int8Writer:
    """What one `--format` writes: the tensors per quantized linear (`written`, in checkpoint
    order), the function computing them from a float weight, and the quantization_config."""

    written: tuple[str, ...]
    quantize: Callable
    quantization_config: Callable[[tuple[str, ...], str], dict]


FORMATS = {  # --format -> what it writes (formats/bnb_int8.py, formats/compressed_tensors.py)
    "bnb": Int8Writer(bnb_int8.WRITTEN, bnb_int8.quantize, bnb_int8.quantization_config),
    "compressed-tensors": Int8Writer(compressed_tensors.WRITTEN, compressed_tensors.quantize, compressed_tensors.quantization_config),
    "w8a8": Int8Writer(compressed_tensors.INT_WRITTEN, compressed_tensors.quantize_w8a8, compressed_tensors.w8a8_quantization_config),
}


@dataclass(frozen=True)
class QuantPlan:
    """Which weights to quantize and which modules transformers must leave alone."""

    layout: str  # "original" or "native"
    selected: tuple[str, ...]  # weight keys
    skip_modules: tuple[str, ...]
    # a sparse LLM: {"quantized": expert linears in 8 bits, "kept": left in their dtype, "note": what a loader does
    # with them in this format, or None}; None for a dense LLM
    experts: dict | None = None


def linear_weights(reader: CheckpointReader, config: dict) -> tuple[str, dict[str, str]]:
    """(layout name, {weight key: group}) for every 2-D linear weight; group is vision,
    projector, head, llm (decoder layers) or experts (a sparse layer's routed experts; its
    router is no linear here and always kept)."""
    if config.get("quantization_config"):
        raise InputError(f"{reader.folder}/config.json: the checkpoint is already quantized "
                         f"({config['quantization_config'].get('quant_method')}); quantize the bf16 checkpoint")
    if config.get("model_type") == "internvl":
        from ..formats.views import open_view

        with open_view(reader.folder):  # the same config-vs-tensor checks as every other command (model_type, head_dim, experts, sidecar)
            pass
        groups = {}
        for spec in reader.specs():
            if len(spec.shape) != 2 or not spec.name.endswith(".weight") or "embed_tokens" in spec.name:
                continue
            group = next((g for g, prefix in towers("native").items() if spec.name.startswith(prefix + ".")), None)
            if group is None and NATIVE_DECODER_LINEAR.fullmatch(spec.name):
                group = "experts" if ".mlp.experts." in spec.name else "llm"
            if group is not None:
                groups[spec.name] = group
        return "native", groups
    layout = build_layout(config, reader.specs())
    check(config, layout)  # every linear holds plain weight / bias only
    if layout.lora:
        raise InputError(f"{reader.folder}: embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
    groups = {}
    for key, info in layout.keys.items():
        if info.is_linear and info.param == "weight" and len(reader.spec(key).shape) == 2:
            groups[key] = {"vision": "vision", "projector": "projector"}.get(info.family, "llm" if info.expert is None else "experts")
        elif info.part == "head" and info.param == "weight":
            groups[key] = "head"
    return "original", groups


def plan_quantization(layout: str, groups: dict[str, str], *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (),
                      experts: bool = True) -> QuantPlan:
    """Select weights (default: the LLM decoder linears, a sparse layer's experts unless
    `experts` is False; --only / --skip regexes override). Experts left out entirely are named
    once per layer in the skip modules (`...layers.N.mlp.experts`)."""
    if only:
        selected = [k for k in groups if any(re.search(p, k) for p in only)]
    else:
        selected = [k for k, g in groups.items() if g == "llm" or (g == "experts" and experts)]
    selected = [k for k in selected if not any(re.search(p, k) for p in skip)]
    chosen = set(selected)
    skip_modules: list[str] = []
    prefixes = towers(layout)
    for group in ("vision", "projector", "head", "llm"):
        keys = [k for k, g in groups.items() if g == group]
        unselected = [k.removesuffix(".weight") for k in keys if k not in chosen]
        if group in prefixes and unselected and len(unselected) == len(keys):
            skip_modules.append(prefixes[group])
        else:
            skip_modules.extend(unselected)
    expert_keys = [k for k, g in groups.items() if g == "experts"]
    if expert_keys and not chosen.intersection(expert_keys):
        skip_modules.extend(dict.fromkeys(re.sub(r"(\.mlp\.experts)\.\d+\..*", r"\1", k) for k in expert_keys))
    else:
        skip_modules.extend(k.removesuffix(".weight") for k in expert_keys if k not in chosen)
    return QuantPlan(layout, tuple(selected), tuple(skip_modules))


class _LastQuantized:
    """Quantize each weight once even though it feeds several outputs (e.g. int8 weight and SCB);
    `quantize(weight)` returns the format's tensors by parameter name."""

    def __init__(self, quantize):
        self.quantize = quantize
        self.key = None
        self.value = None

    def __call__(self, name: str, tensor):
        if tensor.device.type == "meta" or self.key != name:
            value = self.quantize(tensor)
            if tensor.device.type == "meta":
                return value
            _check_finite_scales(name, tensor, value)
            self.key, self.value = name, value
        return self.value


SCALES = ("SCB", "weight_scale")  # the per-row scale each format writes: row absmax (bnb) or absmax / 127


def _check_finite_scales(name: str, weight, value: dict) -> None:
    """Raise InputError (one line) when a weight's row scales, computed from the row absmax anyway,
    are NaN or Inf: the weight holds NaN/Inf (or, for bnb's float16 pass, values beyond 65504), and its
    int8 codes would be garbage. Checks [out] scales only; the weight itself is looked at on refusal."""
    import torch

    scale = next(value[k] for k in SCALES if k in value)
    bad = ~torch.isfinite(scale.reshape(-1))
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    if bool(torch.isfinite(weight[row]).all()):
        why = (f"row {row} holds values beyond float16's range (max |x| {float(weight[row].float().abs().max()):.4g}), "
               "which bitsandbytes' float16 pass turns into Inf; use --format w8a8 or --format compressed-tensors, or --skip it")
    else:
        why = f"row {row} holds NaN or Inf ({int(bad.sum())} of {bad.numel()} rows); fix or replace the checkpoint, or --skip it"
    raise InputError(f"{name}: cannot be quantized to int8: {why}")


def int8_outputs(reader: CheckpointReader, plan: QuantPlan, fmt: str = "bnb") -> list[Output]:
    """The output stream: each quantized weight expanded to its format's tensors (FORMATS[fmt]:
    `written`, computed once per weight), the rest copied."""
    writer = FORMATS[fmt]
    chosen = set(plan.selected)
    last = _LastQuantized(writer.quantize)
    outputs = []
    for name in reader.keys():
        if name not in chosen:
            outputs.append(Output(name, (name,)))
            continue
        stem = name.removesuffix(".weight")
        outputs += [Output(f"{stem}.{param}", (name,), lambda t, n=name, p=param: last(n, t)[p]) for param in writer.written]
    return outputs


# transformers 5.24 (verified on a Qwen3MoeForCausalLM): BitsAndBytesConfig(load_in_8bit=True) replaces
# `type(module) is nn.Linear` only (integrations/bitsandbytes.replace_with_bnb_linear); Qwen3MoeExperts holds its experts
# as fused 3-D parameters (gate_up_proj [E, 2 x moe_inter, hidden], down_proj [E, hidden, moe_inter]), so transformers'
# own 8-bit quantization leaves them bf16 and save_pretrained writes them bf16; per-expert int8 + SCB tensors are
# "unexpected" there and the fused parameters get the raw int8 values without their scales
BNB_EXPERTS_KEPT = ("transformers' bitsandbytes integration converts nn.Linear modules only and keeps Qwen3-MoE's fused "
                    "expert parameters (Qwen3MoeExperts) in bf16, as its own load_in_8bit does; 8-bit expert tensors "
                    "could not fill them")
BNB_EXPERTS_FORCED = ("8-bit experts in the bnb format load only in this toolkit's runtime (chat, verify): transformers' "
                      "bitsandbytes loader converts nn.Linear modules, and Qwen3-MoE's experts are fused 3-D parameters "
                      "there (it would fill them with the raw int8 values); --format compressed-tensors gives 8-bit "
                      "experts that transformers reads")
# compressed-tensors' loader in transformers 5.24 (CompressedTensorsDequantize) rebuilds fused experts from packed
# (weight_packed) or fp8 weights only: int-quantized experts (int8 `weight` + weight_scale) reach its Concatenate empty
W8A8_EXPERTS = ("transformers cannot load W8A8 (int-quantized) experts: its compressed-tensors loader rebuilds the fused "
                "expert parameters from packed (weight_packed) or fp8 weights only; the output is for vLLM and this "
                "toolkit's runtime (chat, verify); --format compressed-tensors (W8A16) gives 8-bit experts that "
                "transformers reads")


def _dialect(config: dict, layout: str):
    """The LLM's dialect record of an original-layout or native-layout config."""
    if layout == "native":
        text = config.get("text_config") or {}
        return dialect_of_native_model_type(text.get("model_type"), "config.json: text_config.model_type", text)
    llm = config.get("llm_config") or {}
    return dialect_of_architecture(llm.get("architectures") or [], "config.json: llm_config.architectures")


def expert_facts(plan: QuantPlan, groups: dict[str, str], fmt: str) -> dict | None:
    """{"quantized", "kept", "note"} for a sparse LLM's expert linears in `fmt` (None without experts): the
    note says what transformers does with them (bnb: kept in bf16 and why; w8a8: not loadable there)."""
    experts = [k for k, g in groups.items() if g == "experts"]
    if not experts:
        return None
    quantized = len(set(experts) & set(plan.selected))
    note = None
    if fmt == "bnb":
        note = BNB_EXPERTS_FORCED if quantized else BNB_EXPERTS_KEPT
    elif fmt == "w8a8" and quantized:
        note = W8A8_EXPERTS
    return {"quantized": quantized, "kept": len(experts) - quantized, "note": note}


def check_fused_selection(reader: CheckpointReader, plan: QuantPlan) -> None:
    """Refuse (InputError, one line) a selection holding some but not all native parts of one
    fused original linear (InternLM2's wqkv, InternViT's attn.qkv): the parts would be stored
    differently and no reader could rebuild the fused tensor. Checked before anything is written."""
    from ..models.views import NativeView  # the links of the native folder (internvl_original.json or config.json)

    try:
        view = NativeView(reader)
    except LayoutError:
        return  # not an InternVL layout this project reads; other checks name what is wrong
    chosen = set(plan.selected)
    for name in view.keys():
        link = view.link(name)
        if len(link.natives) < 2 or not name.endswith(".weight"):
            continue
        stored = [view._native(n) for n in link.natives]
        picked = [n for n in stored if n in chosen]
        if picked and len(picked) < len(stored):
            left = [n for n in stored if n not in chosen]
            modules = ", ".join(n.removesuffix(".weight") for n in stored)
            raise InputError(f"{reader.folder}: --only/--skip select {picked[0].removesuffix('.weight')} but not "
                             f"{left[0].removesuffix('.weight')}, parts of the fused {name.removesuffix('.weight')} "
                             f"in the original layout; select or skip all of {modules} together")


def quantize_int8(source: Path, out: Path, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (), fmt: str = "bnb",
                  max_shard_size: int, overwrite: bool = False, progress: Callable[[int], None] | None = None) -> tuple[Path, QuantPlan]:
    """Write the 8-bit checkpoint; returns its path and the plan used."""
    with CheckpointReader(source) as reader:
        config = reader.config()
        layout, groups = linear_weights(reader, config)
        # bitsandbytes' loaders (transformers, the remote code) convert nn.Linear modules only; a sparse layer's
        # experts are fused 3-D parameters there, which 8-bit expert tensors cannot fill: they stay in bf16
        plan = plan_quantization(layout, groups, only=only, skip=skip, experts=fmt != "bnb")
        facts = expert_facts(plan, groups, fmt)
        if facts is not None:
            plan = replace(plan, experts=facts)
            if fmt == "bnb":  # the routers by name: bitsandbytes' loaders convert any nn.Linear (transformers 4's
                # remote code and vLLM build the router as one) that llm_int8_skip_modules does not name
                rule = re.compile(router_regex(_dialect(config, layout)))
                routers = [k.removesuffix(".weight") for k in reader.keys() if k.endswith(".weight") and rule.match(k.removesuffix(".weight"))]
                plan = replace(plan, skip_modules=plan.skip_modules + tuple(routers))
            if facts["note"]:
                print(f"warning: {facts['note']}", file=sys.stderr)
        if layout == "native":
            check_fused_selection(reader, plan)
        if not plan.selected:
            raise InputError("--only/--skip leave nothing to quantize; check the patterns against `internvl-tools inspect` keys")
        outputs = int8_outputs(reader, plan, fmt)
    new_config = dict(config)
    new_config["quantization_config"] = quant = FORMATS[fmt].quantization_config(plan.skip_modules, layout)
    router = router_regex(_dialect(config, layout)) if plan.experts else None
    if router and "ignore" in quant:  # compressed-tensors: vLLM quantizes a router (GateLinear) that no rule names
        quant["ignore"] = quant["ignore"] + [f"re:{router}"]
    if isinstance(new_config.get("llm_config"), dict):
        new_config["llm_config"] = {k: v for k, v in new_config["llm_config"].items() if k != "quantization_config"}
    path = run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={"config.json": new_config}, progress=progress)
    return path, plan

