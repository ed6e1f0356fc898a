"""The GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`, what
transformers + optimum + gptqmodel and vLLM's `gptq` load).

Per quantized linear [out, in]: `qweight` int32 [in x bits / 32, out] (consecutive input rows
packed from the low bits up), `qzeros` int32 [groups, out x bits / 32] holding zero - 1 (the
v1 quirk) packed along the output axis, `scales` fp16 [groups, out], `g_idx` int32 [in] (the
group of each input column), optional `bias`. W = scales[g] x (q - zeros[g]) per column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import InputError
from .base import Format, check_layout_name, packed_bits, plain_count
from .rules import negative_rules, router_rules

if TYPE_CHECKING:
    import torch

PARAMS = ("qweight", "qzeros", "scales", "g_idx", "bias")
BITS = (2, 4, 8)  # widths that pack into whole int32 words


@dataclass(frozen=True)
class GPTQSettings:
    """The scheme a GPTQ quantization_config records (the calibration's own config may hold more)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01


class GPTQCodes(Protocol):
    """Anything holding a linear's integer codes and group parameters (e.g. calibrate's GPTQResult)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] unsigned codes -> int32 [n * bits / 32, m], row k*per + j in bits j*bits.."""
    import torch

    per = 32 // bits
    if values.shape[0] % per:
        raise ValueError(f"{values.shape[0]} rows do not pack into 32-bit words of {per}")
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])
    packed = torch.zeros(v.shape[0], v.shape[2], dtype=torch.int64)
    for j in range(per):
        packed |= (v[:, j] & (2**bits - 1)) << (bits * j)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(parts, dim=1).reshape(-1, packed.shape[1])


def pack_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Integer codes -> the GPTQ v1 tensors of one linear.

    q: int [out, in] in [0, 2^bits - 1]; scales: float [groups, out]; zeros: int [groups, out];
    g_idx: int [in]. Returns {qweight: int32 [in x bits/32, out], qzeros: int32 [groups,
    out x bits/32] (zero - 1), scales: float16 [groups, out], g_idx: int32 [in]}.
    Raises ValueError when `in` or `out` does not fill whole int32 words."""
    import torch

    return {
        "qweight": _pack_rows(q.T.contiguous(), bits),
        "qzeros": _pack_rows((zeros - 1).T.contiguous(), bits).T.contiguous(),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def pack(codes: GPTQCodes, bits: int) -> dict[str, torch.Tensor]:
    """`pack_codes` of an object holding `q`, `scales`, `zeros`, `g_idx` (see GPTQCodes)."""
    return pack_codes(codes.q, codes.scales, codes.zeros, codes.g_idx, bits)


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight [out, in] a GPTQ v1 linear stands for (shapes as in `pack_codes`)."""
    q = _unpack_rows(qweight, bits)  # [in, out]
    zeros = _unpack_rows(qzeros.T.contiguous(), bits).T + 1  # [groups, out]
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales.float()[g]).T.contiguous()


def packed_shapes(rows: int, cols: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and safetensors dtypes of the packed tensors of a [rows, cols] linear."""
    groups = -(-cols // (group_size if group_size > 0 else cols))
    return {
        "qweight": ((cols * bits // 32, rows), "I32"),
        "qzeros": ((groups, rows * bits // 32), "I32"),
        "scales": ((groups, rows), "F16"),
        "g_idx": ((cols,), "I32"),
    }


def quantization_config(settings: GPTQSettings, layout: str = "original", router: str | None = None) -> dict:
    """quantization_config for transformers (optimum / gptqmodel) and vLLM: the LLM's decoder
    layers quantized, the vision tower and projector kept (`block_name_to_quantize` for
    transformers, negative `dynamic` rules for GPTQModel and vLLM, which match both loaders'
    module names), and a sparse LLM's routers (`router`: rules.router_regex) kept too. Raises
    ValueError for an unknown layout."""
    check_layout_name(layout)
    kept = negative_rules(layout) + ([f"-:{router}"] if router else [])
    block = "model.language_model.layers" if layout == "native" else "language_model.model.layers"
    return {
        "quant_method": "gptq", "bits": settings.bits, "group_size": settings.group_size, "desc_act": settings.desc_act,
        "sym": settings.sym, "damp_percent": settings.damp, "true_sequential": True, "static_groups": False,
        "checkpoint_format": "gptq", "block_name_to_quantize": block, "lm_head": False,
        "dynamic": {rule: {} for rule in kept},
        "meta": {"quantizer": ["internvl-tools"]},
    }


def settings_of(quant: dict) -> GPTQSettings:
    """The GPTQSettings a GPTQ quantization_config records."""
    return GPTQSettings(bits=quant["bits"], group_size=quant.get("group_size", 128), sym=quant.get("sym", True),
                        desc_act=quant.get("desc_act", False), damp=quant.get("damp_percent", 0.01))


def matches(quant: dict) -> bool:
    """True for `quant_method: gptq`."""
    return quant.get("quant_method") == "gptq"


def check_config(quant: dict) -> None:
    """Raise InputError for GPTQ variants this toolkit does not read (v2 / marlin checkpoints,
    widths that straddle int32 words)."""
    fmt = quant.get("checkpoint_format", "gptq")
    if fmt != "gptq" or quant.get("is_marlin_format"):
        raise InputError(f"config.json: GPTQ checkpoint_format {fmt!r}{' (marlin)' if quant.get('is_marlin_format') else ''} "
                         "is not supported; this toolkit reads GPTQ v1 (checkpoint_format: gptq)")
    packed_bits(quant, "GPTQ", allowed=BITS)


def count(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Parameters a tensor stands for: `qweight` x 32 / bits (unpacked), `weight` / `bias`
    element by element, `qzeros` / `scales` / `g_idx` 0."""
    if param == "qweight":
        return plain_count(param, shape, quant) * 32 // packed_bits(quant, "GPTQ", allowed=BITS)
    if param in ("qzeros", "scales", "g_idx"):
        return 0
    return plain_count(param, shape, quant)


def weight_shape(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of a GPTQ linear from its `qweight` header: [in x bits / 32, out]."""
    rows, out = specs["qweight"].shape
    return out, rows * 32 // packed_bits(quant, "GPTQ", allowed=BITS)


def dequantize(tensors: Mapping[str, torch.Tensor], quant: dict) -> torch.Tensor:
    """{qweight, qzeros, scales[, g_idx]} of one linear -> float32 weight [out, in]
    (without g_idx, column c is in group c // group_size)."""
    import torch

    bits = packed_bits(quant, "GPTQ", allowed=BITS)
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        columns = tensors["qweight"].shape[0] * 32 // bits
        group = quant.get("group_size", -1)
        g_idx = torch.arange(columns) // (group if group and group > 0 else columns)
    return unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, bits)


def _router(quant: dict) -> str | None:
    """The router rule a GPTQ config carries (the same in both layouts), or None."""
    return next((rule[2:] for rule in quant.get("dynamic") or {} if rule.startswith("-:") and rule[2:] in router_rules()), None)


def to_native(quant: dict, record=None) -> dict:
    """The GPTQ quantization_config rebuilt for the native layout from the scheme it records."""
    return quantization_config(settings_of(quant), "native", _router(quant))


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """The GPTQ quantization_config rebuilt for the original layout from the scheme it records."""
    return quantization_config(settings_of(quant), "original", _router(quant))


FORMAT = Format(
    name="gptq", library="AutoGPTQ / GPTQModel (GPTQ v1)", quant_method="gptq", params=PARAMS,
    required=("qweight", "qzeros", "scales"), marker="qweight", matches=matches, check_config=check_config,
    count=count, weight_shape=weight_shape, dequantize=dequantize, to_native=to_native, to_original=to_original,
)
