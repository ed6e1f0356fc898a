"""bitsandbytes LLM.int8() serialization: what `load_in_8bit=True` + `save_pretrained` writes.

Per quantized linear [out, in]: `weight` int8 [out, in] (round(W x 127 / row absmax), computed
the way bitsandbytes does: W cast to float16, absmax in float32), `SCB` float32 [out] (the row
absmax), `weight_format` uint8 scalar (0: bitsandbytes' "row" layout), optional `bias`.
config.json: `quant_method: bitsandbytes`, `load_in_8bit: true`, `llm_int8_skip_modules` naming
what stays in float. The quantizer is a re-statement, block of rows by block of rows, whose
bytes equal bitsandbytes' `int8_vectorwise_quant` (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from ..io.buffers import output_like
from .base import Format, block_rows, check_layout_name, row_absmax
from .rules import loader_names, native_modules, original_modules, original_routers, skipped_by_name

if TYPE_CHECKING:
    import torch

PARAMS = ("weight", "SCB", "weight_format", "bias")
WRITTEN = ("weight", "SCB", "weight_format")  # the tensors `quantize` returns, in checkpoint order
WEIGHT_FORMAT_ROW = 0  # bitsandbytes' code for the "row" layout


def matches(quant: dict) -> bool:
    """True for `quant_method: bitsandbytes` (or an old config with only `load_in_8bit/4bit`)."""
    if quant.get("quant_method") == "bitsandbytes":
        return True
    return quant.get("quant_method") is None and bool(quant.get("load_in_8bit") or quant.get("load_in_4bit"))


def check_config(quant: dict) -> None:
    """Raise InputError for bitsandbytes 4-bit (nf4/fp4), which this toolkit does not read."""
    if quant.get("load_in_4bit") or not quant.get("load_in_8bit", True):
        raise InputError("config.json: a bitsandbytes 4-bit checkpoint (load_in_4bit); only 8-bit (load_in_8bit) "
                         "bitsandbytes checkpoints are supported: quantize the bf16 checkpoint instead")


def count(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Parameters a tensor stands for: the int8 `weight` and `bias` count element by element,
    `SCB` and `weight_format` (quantization state) count 0."""
    if param in ("SCB", "weight_format"):
        return 0
    total = 1
    for size in shape:
        total *= size
    return total


def fused(quant: dict) -> dict[str, str]:
    """How a fused linear's tensors split / merge (models/native_map.py): the int8 weight and SCB
    by rows (row-wise absmax: a row's bytes do not depend on the other rows), weight_format is
    the same scalar in every part."""
    return {"weight": "rows", "SCB": "rows", "bias": "rows", "weight_format": "same"}


def weight_shape(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of a linear: its int8 `weight` has the float weight's shape."""
    return tuple(specs["weight"].shape)


def quantize_rowwise(weight: torch.Tensor, row_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], float32 row absmax [out]), bitsandbytes' bytes.

    Computed block of rows by block of rows (`row_block` rows, default: about BLOCK_ELEMENTS
    elements) in buffers reused from block to block: W cast to float16, absmax of the float16
    rows, W x (127 / absmax) in float32, rounded half to even; no whole-tensor temporaries.
    A meta tensor gives meta outputs (for spec planning). Raises ValueError for a non-2-D weight."""
    import torch

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    if weight.device.type == "meta":
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
    rows, cols = weight.shape
    quantized = output_like(weight, torch.int8)  # reused from item to item in a pipeline run
    scales = torch.empty(rows, dtype=torch.float32)
    step = block_rows(weight.shape, row_block)
    work = torch.empty(step, cols, dtype=torch.float32)  # reused: W, then W as float16 holds it, then the codes
    half = torch.empty(step, cols, dtype=torch.float16)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = work[: stop - start].copy_(weight[start:stop])
        block.copy_(half[: stop - start].copy_(block))  # W cast to float16 (through float32: the same rounding)
        absmax = row_absmax(block)
        # 127 / absmax is torch's reciprocal-then-multiply, as bitsandbytes' re-statement always did
        block.mul_(127.0 / absmax).round_()
        quantized[start:stop].copy_(block)
        scales[start:stop] = absmax.squeeze(1)
    return quantized, scales


def dequantize_rowwise(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 weight [out, in] and row absmax [out] -> float32 [out, in]: W ~ q x SCB / 127."""
    return quantized.float() * (scales.float().unsqueeze(-1) / 127.0)


def weight_format(device: torch.device | str = "cpu") -> torch.Tensor:
    """The uint8 scalar `weight_format` bitsandbytes stores next to each int8 weight (0: row)."""
    import torch

    return torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8, device=device)


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One float linear weight [out, in] -> {weight: int8 [out, in], SCB: float32 [out],
    weight_format: uint8 []}, the tensors of WRITTEN (meta in, meta out)."""
    q, scb = quantize_rowwise(weight)
    return {"weight": q, "SCB": scb, "weight_format": weight_format(weight.device)}


def dequantize(tensors: Mapping[str, torch.Tensor], quant: dict) -> torch.Tensor:
    """{weight: int8 [out, in], SCB: [out], ...} of one linear -> float32 weight [out, in]."""
    return dequantize_rowwise(tensors["weight"], tensors["SCB"])


def quantization_config(skip_modules: Sequence[str], layout: str = "original") -> dict:
    """The quantization_config transformers reads for a pre-quantized 8-bit checkpoint.

    `skip_modules`: modules left in float, in the layout's own names (e.g. `vision_model`,
    `mlp1`, `language_model.lm_head`; or `model.vision_tower`, ..., `lm_head`). On the native
    layout each is listed under vLLM's name as well. Raises ValueError for an unknown layout."""
    check_layout_name(layout)
    return {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "load_in_4bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": loader_names(skip_modules, layout),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_quant_storage": "uint8",
    }


def to_native(quant: dict, record=None) -> dict:
    """An original-layout bitsandbytes config with its skip modules renamed for the native layout
    (`record`: the LLM's dialect, for its linears' native names).

    Raises InputError for a skip module with no native name."""
    natives = [n for module in quant.get("llm_int8_skip_modules") or [] for n in native_modules(module, record)]
    return dict(quant, llm_int8_skip_modules=loader_names(natives, "native"))


def _whole_experts(kept: list[str], modules: dict[str, str]) -> list[str]:
    """`kept` with the expert linears of a sparse layer named once, as `...layers.N.mlp.experts`, where every
    one of them is kept (what transforms/int8.py writes; 18432 names otherwise on Qwen3-30B-A3B)."""
    layers: dict[str, list[str]] = {}
    for original in dict.fromkeys(modules.values()):
        head, dot, _rest = original.partition(".mlp.experts.")
        if dot:
            layers.setdefault(head + ".mlp.experts", []).append(original)
    chosen = set(kept)
    whole = {layer for layer, members in layers.items() if all(m in chosen for m in members)}
    out: list[str] = []
    for name in kept:
        head, dot, _rest = name.partition(".mlp.experts.")
        collapsed = head + ".mlp.experts" if dot and head + ".mlp.experts" in whole else name
        if collapsed not in out:
            out.append(collapsed)
    return out


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """A native-layout bitsandbytes config with its skip modules named in the original layout
    (`modules`: {native linear module: original one}; formats/rules.py). Raises InputError."""
    skip = quant.get("llm_int8_skip_modules") or []
    kept = _whole_experts(original_modules(modules, lambda native: skipped_by_name(native, skip)), modules)
    # a sparse LLM's routers are named too (no linears of the layout: transforms/int8.py); vLLM's name is the original one
    routers = original_routers(skip)
    return dict(quant, llm_int8_skip_modules=loader_names(list(dict.fromkeys(kept + routers)), "original"))


FORMAT = Format(
    name="bnb_int8", library="bitsandbytes (LLM.int8, transformers load_in_8bit)", quant_method="bitsandbytes",
    params=PARAMS, required=("weight", "SCB"), marker="SCB", matches=matches, check_config=check_config, count=count,
    weight_shape=weight_shape, dequantize=dequantize, to_native=to_native, to_original=to_original,
    fused=fused,
)
