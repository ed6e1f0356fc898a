"""AWQ, the "gemm" version: what AutoAWQ, LMDeploy `lite auto_awq` and vLLM's `awq` read.

Per quantized linear [out, in], 4-bit, groups of `group_size` input rows: `qweight` int32
[in, out / 8], `qzeros` int32 [in / group, out / 8], `scales` fp16 [in / group, out], optional
`bias`. Eight nibbles per int32 along the OUTPUT axis in the interleaved order (0, 2, 4, 6, 1,
3, 5, 7): nibble i of word c holds output column 8c + ORDER[i]. Zeros are stored as they are
(no -1 offset, unlike GPTQ v1). W^T = (q - z) x s per group of input rows. config.json:
`quant_method: awq`, `bits: 4`, `group_size`, `zero_point: true`, `version: gemm`,
`modules_to_not_convert`, at the TOP level (LMDeploy puts it in llm_config, where vLLM does
not find it: vllm#11122). The AWQ search itself (calibrate/) is not part of this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from .base import Format, check_layout_name, first_present, plain_count
from .rules import loader_names, native_modules, original_modules, original_routers, skipped_by_name

if TYPE_CHECKING:
    import torch

PARAMS = ("qweight", "qzeros", "scales", "bias")
BITS = 4
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column ORDER[i]
REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column k is nibble REVERSE_ORDER[k]


def matches(quant: dict) -> bool:
    """True for `quant_method: awq`."""
    return quant.get("quant_method") == "awq"


def settings_of(quant: dict) -> tuple[int, int]:
    """(bits, group_size) of an AWQ config (transformers' `bits`/`group_size` or AutoAWQ's `w_bit`/`q_group_size`)."""
    return int(first_present(quant, "bits", "w_bit", default=BITS)), int(first_present(quant, "group_size", "q_group_size", default=128))


def check_config(quant: dict) -> None:
    """Raise InputError for AWQ variants this toolkit does not read (gemv / exllama / marlin
    versions, widths other than 4 bits, zero_point false)."""
    version = str(first_present(quant, "version", default="gemm")).lower()
    if version != "gemm":
        raise InputError(f"config.json: AWQ version {version!r} is not supported; this toolkit reads the gemm version")
    bits, _group = settings_of(quant)
    if bits != BITS:
        raise InputError(f"config.json: AWQ bits {bits} is not supported; the gemm version packs 4 bits")
    if first_present(quant, "zero_point", default=True) is False:
        raise InputError("config.json: AWQ zero_point false is not supported; the gemm version stores zeros")


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out / 8] -> int32 [rows, out] in output order (undoes the interleave)."""
    import torch

    p = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [rows, words, nibble]
    return nibbles[..., list(REVERSE_ORDER)].reshape(packed.shape[0], -1).to(torch.int32)


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [rows, out] in [0, 15] -> int32 [rows, out / 8] in AWQ's interleaved order.

    Raises ValueError when `out` is not a multiple of 8."""
    import torch

    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"{cols} output columns do not pack into words of 8 nibbles")
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, column in enumerate(ORDER):
        packed |= (v[..., column] & 0xF) << (4 * i)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer codes of one linear -> its AWQ gemm tensors.

    q: int [out, in] in [0, 15]; scales: float [in / group, out]; zeros: int [in / group, out]
    in [0, 15]. Returns {qweight: int32 [in, out / 8], qzeros: int32 [in / group, out / 8],
    scales: float16 [in / group, out]}. Raises ValueError when out is not a multiple of 8."""
    import torch

    return {"qweight": _pack_columns(q.T.contiguous()), "qzeros": _pack_columns(zeros), "scales": scales.to(torch.float16)}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] an AWQ gemm linear stands for (shapes as in `pack`)."""
    import torch

    q = _unpack_columns(qweight)  # [in, out]
    zeros = _unpack_columns(qzeros)  # [groups, out]
    rows_per_group = -(-q.shape[0] // scales.shape[0])
    g = torch.arange(q.shape[0]) // rows_per_group
    return ((q - zeros[g]).float() * scales.float()[g]).T.contiguous()


def count(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Parameters a tensor stands for: `qweight` x 32 / bits (unpacked), `weight` / `bias`
    element by element, `qzeros` / `scales` 0."""
    if param == "qweight":
        return plain_count(param, shape, quant) * 32 // settings_of(quant)[0]
    if param in ("qzeros", "scales"):
        return 0
    return plain_count(param, shape, quant)


def weight_shape(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of an AWQ linear from its `qweight` header [in, out / 8]."""
    rows, words = specs["qweight"].shape
    return words * 32 // settings_of(quant)[0], rows


def dequantize(tensors: Mapping[str, torch.Tensor], quant: dict) -> torch.Tensor:
    """{qweight, qzeros, scales} of one linear -> float32 weight [out, in]."""
    return unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"])


def quantization_config(skip_modules: Sequence[str], layout: str = "original", *, group_size: int = 128) -> dict:
    """quantization_config of an AWQ gemm 4-bit checkpoint (transformers' AwqConfig fields,
    which vLLM reads too). `skip_modules` in the layout's names go to `modules_to_not_convert`,
    on the native layout under vLLM's names as well. Raises ValueError for an unknown layout."""
    check_layout_name(layout)
    return {"quant_method": "awq", "bits": BITS, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": loader_names(skip_modules, layout)}


def to_native(quant: dict, record=None) -> dict:
    """An original-layout AWQ config with `modules_to_not_convert` renamed for the native layout
    (`record`: the LLM's dialect, for its linears' native names).

    Raises InputError for a module with no native name."""
    natives = [n for module in quant.get("modules_to_not_convert") or [] for n in native_modules(module, record)]
    return dict(quant, modules_to_not_convert=loader_names(natives, "native"))


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """A native-layout AWQ config with `modules_to_not_convert` named in the original layout."""
    skip = quant.get("modules_to_not_convert") or []
    kept = original_modules(modules, lambda native: skipped_by_name(native, skip))
    # a sparse LLM's routers, named one by one (no linears of the layout: calibrate/awq_quantizer.py)
    return dict(quant, modules_to_not_convert=loader_names(list(dict.fromkeys(kept + original_routers(skip))), "original"))


FORMAT = Format(
    name="awq", library="AutoAWQ (gemm; LMDeploy, vLLM awq)", quant_method="awq", params=PARAMS,
    required=("qweight", "qzeros", "scales"), marker="qweight", matches=matches, check_config=check_config,
    count=count, weight_shape=weight_shape, dequantize=dequantize, to_native=to_native, to_original=to_original,
)
