"""The on-disk formats, detection from config.json, and the checks every reader applies.

`detect(config, keys)` names the format of a checkpoint (plain, bnb_int8, gptq,
compressed_tensors, compressed_tensors_int8, awq) from its top-level `quantization_config`; `validate(fmt, layout)`
checks that every linear's parameter names are ones that format owns (models/layout.py accepts
any identifier there and leaves this check to the formats).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ..errors import LayoutError
from ..models.layout import KeyInfo, Layout
from . import awq, bnb_int8, compressed_tensors, gptq, plain
from .base import Format, plain_fused, split_key

FORMATS: tuple[Format, ...] = (plain.FORMAT, bnb_int8.FORMAT, gptq.FORMAT, compressed_tensors.FORMAT,
                             compressed_tensors.INT8_FORMAT, awq.FORMAT)
BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def get_format(name: str) -> Format:
    """The format record named `name` (plain, bnb_int8, gptq, compressed_tensors, compressed_tensors_int8, awq);
    KeyError otherwise."""
    return BY_NAME[name]


def quantization_config(config: dict) -> dict:
    """The top-level quantization_config of a config.json ({} when there is none).

    Raises LayoutError when it sits only inside llm_config (LMDeploy's AWQ outputs do this;
    transformers and vLLM do not find it there) or is not an object."""
    quant = config.get("quantization_config")
    if quant is None:
        nested = (config.get("llm_config") or {}).get("quantization_config") if isinstance(config.get("llm_config"), dict) else None
        if nested:
            raise LayoutError("config.json: quantization_config is inside llm_config, where transformers and vLLM do not look "
                              "(vllm#11122); move it to the top level of config.json")
        return {}
    if not isinstance(quant, dict):
        raise LayoutError(f"config.json: quantization_config is a {type(quant).__name__}, not an object")
    return quant


def detect(config: dict, keys: Iterable[str] = ()) -> Format:
    """The format of a checkpoint from its config.json and (for a clearer error) its keys.

    Raises LayoutError / InputError (one line) for an unknown quant_method, a variant of a known
    format this toolkit does not read, or quantized tensors without a quantization_config."""
    quant = quantization_config(config)
    found = [fmt for fmt in FORMATS if fmt.matches(quant)]
    if not found:
        names = ", ".join(dict.fromkeys(f.quant_method for f in FORMATS if f.quant_method))
        raise LayoutError(f"config.json: quantization_config.quant_method {quant.get('quant_method')!r} is not supported; "
                          f"this toolkit reads plain checkpoints and {names}")
    fmt = found[0]
    fmt.check_config(quant)
    if fmt is plain.FORMAT:
        refuse_unannounced_quantization(keys)
    return fmt


def refuse_unannounced_quantization(keys: Iterable[str], config: dict | None = None) -> None:
    """Quantized tensors (gptq / awq qweight, compressed-tensors weight_packed, bnb SCB, ...) in a
    checkpoint whose config.json declares no quantization (with `config`: only checked when its
    top-level quantization_config is absent). Every command that opens a checkpoint calls this
    before building anything from it (formats/views.open_view, quantize, convert), so the same
    one-line LayoutError names the key and the fix (restore the config.json)."""
    if config is not None and quantization_config(config):
        return
    for key in keys:
        param = split_key(key)[1]
        owners = [f for f in FORMATS[1:] if param in f.state_params and param not in plain.PARAMS]
        if owners:
            raise LayoutError(f"key {key!r} is a quantized tensor ({' / '.join(f.name for f in owners)}) but config.json has no "
                              "quantization_config; restore the config.json that came with these weights")


def _linear_keys(layout: Layout) -> list[KeyInfo]:
    """Keys that are parameters of a linear (decoder layer, ViT layer, mlp1, head), LoRA excluded."""
    return [info for info in layout.keys.values() if info.lora is None and (info.is_linear or info.part == "head")]


def validate(fmt: Format, layout: Layout) -> None:
    """Check every linear's parameter names against the format, and that a quantized linear
    holds every tensor the format requires.

    Raises LayoutError (one line naming the key, the format and what it expects)."""
    modules: dict[str, set[str]] = defaultdict(set)
    for info in _linear_keys(layout):
        if info.param not in fmt.allowed:
            raise LayoutError(f"key {info.key!r}: parameter {info.param!r} is not part of the {fmt.name} format "
                              f"(a linear holds {fmt.expects()}); is config.json's quantization_config right for these weights?")
        modules[split_key(info.key)[0]].add(info.param)
    for stem, params in modules.items():
        if params & (fmt.state_params - set(plain.PARAMS)):
            missing = [p for p in fmt.required if p not in params]
            if missing:
                raise LayoutError(f"module {stem!r}: {fmt.name} tensor {stem}.{missing[0]} is missing "
                                  f"(a quantized linear holds {', '.join(fmt.required)}); the checkpoint is incomplete")
            if fmt.marker != "weight" and "weight" in params and "weight" not in fmt.params:
                raise LayoutError(f"module {stem!r} holds both a float weight and {fmt.name} tensors; the checkpoint is inconsistent")


def check(config: dict, layout: Layout) -> Format:
    """detect + validate: the format of a classified checkpoint, checked key by key."""
    fmt = detect(config, layout.keys)
    validate(fmt, layout)
    return fmt


def fused_params(config: dict) -> dict[str, str]:
    """{param: kind}: how the tensors of a fused linear (InternLM2's wqkv, InternViT's qkv) of a
    checkpoint with this config.json split into / merge from their native parts, per its format
    (models/native_map.py); a linear the format leaves in float keeps its plain weight / bias.
    Raises LayoutError / InputError as `detect`."""
    return {**plain_fused({}), **detect(config).fused(quantization_config(config))}


def to_native(quant: dict, record=None) -> dict:
    """An original-layout quantization_config rewritten with native-layout module names
    (`record`: the LLM's dialect record, for its head and decoder linears; None: names as Llama's).

    Raises InputError for a format or rule that cannot be rewritten."""
    if not quant:
        return quant
    return detect({"quantization_config": quant}).to_native(quant, record)


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """A native-layout quantization_config rewritten with original-layout module names;
    `modules`: {native linear module: original linear module} of the checkpoint.

    Raises InputError for a rule the original layout cannot express."""
    if not quant:
        return quant
    return detect({"quantization_config": quant}).to_original(quant, modules)


def parameter_count(fmt: Format, quant: dict, info: KeyInfo, shape: tuple[int, ...]) -> int:
    """Parameters one key stands for: unpacked size for a linear's quantized weight, 0 for
    quantization state (scales, zeros, g_idx, SCB, shapes) and LoRA factors, else its elements."""
    if info.lora is not None:
        return 0
    if info.is_linear or info.part == "head":
        return fmt.count(info.param, tuple(shape), quant)
    return plain.FORMAT.count(info.param, tuple(shape), quant)
