"""`quantize --method int8`: a pre-quantized 8-bit checkpoint, streamed.

Every linear of the LLM's decoder layers becomes int8: in bitsandbytes' format (int8 weight +
row absmax SCB + weight_format), or in compressed-tensors' W8A16 pack-quantized format
(weight_packed + per-channel weight_scale + weight_shape) that vLLM serves; the vision tower,
mlp1, embeddings, norms and the head keep their dtype and bytes. Works on
the original layout (remote code / this project's runtime) and on the native layout written
by `convert --to hf` (plain transformers + bitsandbytes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..formats import bnb_int8, compressed_tensors
from ..formats.registry import check
from ..formats.rules import towers
from ..io.reader import CheckpointReader
from ..models.layout import build_layout
from ..models.vision import NATIVE_LLM_PREFIX
from .stream import Output, run_transform

NATIVE_DECODER_LINEAR = re.compile(re.escape(NATIVE_LLM_PREFIX) + r"\.layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+_proj\.weight")
FORMATS = {"bnb": bnb_int8, "compressed-tensors": compressed_tensors}  # --format -> the formats/ module it writes


@dataclass(frozen=True)
class QuantPlan:
    """Which weights to quantize and which modules transformers must leave alone."""

    layout: str  # "original" or "native"
    selected: tuple[str, ...]  # weight keys
    skip_modules: tuple[str, ...]


def linear_weights(reader: CheckpointReader, config: dict) -> tuple[str, dict[str, str]]:
    """(layout name, {weight key: group}) for every 2-D linear weight; group is vision,
    projector, head or llm (decoder layers)."""
    if config.get("quantization_config"):
        raise InputError(f"{reader.folder}/config.json: the checkpoint is already quantized "
                         f"({config['quantization_config'].get('quant_method')}); quantize the bf16 checkpoint")
    if config.get("model_type") == "internvl":
        groups = {}
        for spec in reader.specs():
            if len(spec.shape) != 2 or not spec.name.endswith(".weight") or "embed_tokens" in spec.name:
                continue
            group = next((g for g, prefix in towers("native").items() if spec.name.startswith(prefix + ".")), None)
            if group is None and NATIVE_DECODER_LINEAR.fullmatch(spec.name):
                group = "llm"
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
            groups[key] = {"vision": "vision", "projector": "projector"}.get(info.family, "llm")
        elif info.part == "head" and info.param == "weight":
            groups[key] = "head"
    return "original", groups


def plan_quantization(layout: str, groups: dict[str, str], *, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> QuantPlan:
    """Select weights (default: the LLM decoder linears; --only / --skip regexes override)."""
    if only:
        selected = [k for k in groups if any(re.search(p, k) for p in only)]
    else:
        selected = [k for k, g in groups.items() if g == "llm"]
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
            self.key, self.value = name, value
        return self.value


def int8_outputs(reader: CheckpointReader, plan: QuantPlan, fmt: str = "bnb") -> list[Output]:
    """The output stream: each quantized weight expanded to its format's tensors (formats/bnb_int8.py
    or formats/compressed_tensors.py: WRITTEN, computed once per weight), the rest copied."""
    module = FORMATS[fmt]
    chosen = set(plan.selected)
    last = _LastQuantized(module.quantize)
    outputs = []
    for name in reader.keys():
        if name not in chosen:
            outputs.append(Output(name, (name,)))
            continue
        stem = name.removesuffix(".weight")
        outputs += [Output(f"{stem}.{param}", (name,), lambda t, n=name, p=param: last(n, t)[p]) for param in module.WRITTEN]
    return outputs


def quantize_int8(source: Path, out: Path, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (), fmt: str = "bnb",
                  max_shard_size: int, overwrite: bool = False, progress: Callable[[int], None] | None = None) -> tuple[Path, QuantPlan]:
    """Write the 8-bit checkpoint; returns its path and the plan used."""
    with CheckpointReader(source) as reader:
        config = reader.config()
        layout, groups = linear_weights(reader, config)
        plan = plan_quantization(layout, groups, only=only, skip=skip)
        if not plan.selected:
            raise InputError("--only/--skip leave nothing to quantize; check the patterns against `internvl-tools inspect` keys")
        outputs = int8_outputs(reader, plan, fmt)
    new_config = dict(config)
    new_config["quantization_config"] = FORMATS[fmt].quantization_config(plan.skip_modules, layout)
    if isinstance(new_config.get("llm_config"), dict):
        new_config["llm_config"] = {k: v for k, v in new_config["llm_config"].items() if k != "quantization_config"}
    path = run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={"config.json": new_config}, progress=progress)
    return path, plan

