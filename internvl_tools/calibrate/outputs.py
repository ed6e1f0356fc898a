"""What the calibrated quantizers (GPTQ, AWQ) share about their outputs: the modules left in
float (vision tower, projector, head), and the compressed-tensors W4A16 / W8A16 target
(`--format compressed-tensors`: symmetric, group-wise, what vLLM serves natively).

The on-disk layouts themselves live in formats/ (gptq.py, awq.py, compressed_tensors.py).
"""

from __future__ import annotations

from ..errors import InputError
from ..formats import compressed_tensors
from ..formats.rules import router_regex
from ..io.safetensors_format import TensorSpec, torch_dtype
from ..models.layout import Layout
from ..models.vision import PROJECTOR, VISION

CT_FORMAT = "compressed-tensors"


def kept_modules(layout: Layout) -> list[str]:
    """Modules a calibrated quantizer leaves in float, original names: the vision tower, the
    projector (mlp1) and the LLM's head (`language_model.lm_head`, InternLM2 `language_model.output`)."""
    heads = [info.key.removesuffix(f".{info.param}") for info in layout.keys.values() if info.part == "head" and info.param == "weight"]
    return [VISION.prefix, PROJECTOR.prefix, *heads]


def group_count(spec: TensorSpec, group_size: int, *, what: str, whole: bool = True) -> int:
    """Groups per row of linear `spec` [out, in] (group_size <= 0: one). With `whole`, InputError
    naming the linear when group_size does not divide its input width."""
    cols = spec.shape[1]
    if group_size <= 0:
        return 1
    if whole and cols % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16) if cols % g == 0]
        hint = f"; {divisors[0]} divides it" if divisors else ""
        raise InputError(f"{spec.name}: its {cols} input features are not a multiple of --group-size {group_size}, which "
                         f"{what} needs{hint}")
    return -(-cols // group_size)


def check_group_size(widths: dict[str, int], group_size: int, *, what: str) -> None:
    """Refuse (InputError) a `group_size` > 0 that does not divide the input width of every linear
    (`widths`: weight key -> input features): the first such linear is named with a group size that
    divides every one of them, so the suggested rerun does not fail on the next linear. GPTQ's own
    format would pack a ragged last group, but transformers + gptqmodel refuse to load it
    ("in_features 64 must be divisible by group_size 128"); AWQ and compressed-tensors cannot
    store it at all."""
    if group_size <= 0:
        return
    bad = [(name, cols) for name, cols in widths.items() if cols % group_size]
    if not bad:
        return
    name, cols = bad[0]
    fits = [g for g in (256, 128, 64, 32, 16, 8) if all(c % g == 0 for c in widths.values())]
    hint = (f"--group-size {fits[0]} divides every linear's input width" if fits
            else "no group size of 8..256 divides every linear's input width")
    raise InputError(f"{name}: its {cols} input features are not a multiple of --group-size {group_size} "
                     f"({len(bad)} of {len(widths)} linears are not), which {what} needs; {hint}")


def ct_specs(spec: TensorSpec, bits: int, group_size: int) -> list[TensorSpec]:
    """The compressed-tensors tensors replacing linear weight `spec` [out, in]: weight_packed,
    weight_scale (in the weight's dtype, as vLLM loads it), weight_shape. InputError when the
    group size does not divide the input width."""
    rows, cols = spec.shape
    groups = group_count(spec, group_size, what="compressed-tensors group quantization")
    stem = spec.name.removesuffix(".weight")
    return [TensorSpec(f"{stem}.{part}", dtype, shape)
            for part, (shape, dtype) in compressed_tensors.packed_shapes(rows, cols, bits, groups, spec.dtype).items()]


def ct_quantization_config(layout: Layout, bits: int, group_size: int) -> dict:
    """quantization_config of a symmetric W{bits}A16 pack-quantized output (per group, or per
    channel for group_size <= 0) with `ignore` rules for the vision tower, projector and head, and
    a sparse LLM's routers (formats/rules.router_regex: vLLM would quantize them otherwise)."""
    quant = compressed_tensors.quantization_config(kept_modules(layout), "original", bits=bits,
                                                   group_size=group_size if group_size > 0 else None, symmetric=True)
    router = router_regex(layout.record)
    return dict(quant, ignore=quant["ignore"] + [f"re:{router}"]) if router else quant


def scale_dtype_name(spec: TensorSpec) -> str:
    """The torch dtype name ("bfloat16", ...) of a weight spec: compressed-tensors stores scales in it."""
    return str(torch_dtype(spec.dtype)).removeprefix("torch.")
