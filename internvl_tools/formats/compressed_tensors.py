"""compressed-tensors `pack-quantized` and `int-quantized` (what llm-compressor writes and vLLM
serves natively).

Per quantized linear [out, in]: `weight_packed` int32 [out, ceil(in x bits / 32)] (signed codes
+ 2^(bits-1), element i of a row in bits i x bits.. of the row's little-endian bit stream, as
compressed-tensors' `pack_to_int32`), `weight_scale` [out, 1] (channel), [out, groups] (group)
or [1] (tensor) in the model dtype, `weight_shape` int64 [2] (out, in), and for asymmetric
schemes `weight_zero_point` (packed the same way along the output axis), for act-order
`weight_g_idx` int [in]. W = (q - zero_point) x scale. config.json: `quant_method:
compressed-tensors`, `format: pack-quantized`, `config_groups` (targets + weight scheme),
`ignore` (modules left in float). This toolkit writes W8A16 (8-bit, symmetric, per channel;
`quantize --method int8`) and W4A16 / W8A16 symmetric per group (`quantize --method gptq|awq
--format compressed-tensors`, codes and scales from the calibrated quantizer).

`int-quantized` (W8A8, `quantize --method int8 --format w8a8`; a second Format record,
INT8_FORMAT): per quantized linear `weight` int8 [out, in] and `weight_scale` [out, 1] (float32
here; no zero point when symmetric), W = q x scale; config_groups add `input_activations`
(8-bit, symmetric, dynamic, per token: vLLM quantizes activations on the fly and runs int8 GEMMs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from ..io.buffers import output_like, output_tensor
from .base import Format, block_rows, check_layout_name, plain_count, row_absmax
from .rules import ignore_rules, ignored_by_rule, native_rule, original_modules, router_rules

if TYPE_CHECKING:
    import torch

PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "bias")
WRITTEN = ("weight_packed", "weight_scale", "weight_shape")  # what `quantize` returns, in checkpoint order
FORMAT_NAME = "pack-quantized"
INT_PARAMS = ("weight", "weight_scale", "weight_zero_point", "bias")  # int-quantized: int8 weight, unpacked
INT_WRITTEN = ("weight", "weight_scale")  # what `quantize_w8a8` returns, in checkpoint order
INT_FORMAT_NAME = "int-quantized"
ROW_BLOCK = 256  # rows per step of pack_to_int32


# -- the scheme recorded in config.json ------------------------------------------------------
def weight_schemes(quant: dict) -> list[dict]:
    """The `weights` dict of every config group (empty dicts for groups without one)."""
    return [dict(group.get("weights") or {}) for group in (quant.get("config_groups") or {}).values()]


def formats_of(quant: dict) -> set[str]:
    """The compression formats a config declares (top-level `format` and each group's)."""
    found = {g.get("format") for g in (quant.get("config_groups") or {}).values() if g.get("format")}
    return found | ({quant["format"]} if quant.get("format") else set())


def scheme(quant: dict) -> dict:
    """The one weight scheme of the checkpoint: {num_bits, strategy, group_size, symmetric}."""
    weights = weight_schemes(quant)[0]
    return {"num_bits": int(weights.get("num_bits", 8)), "strategy": weights.get("strategy", "channel"),
            "group_size": weights.get("group_size"), "symmetric": weights.get("symmetric", True)}


def matches(quant: dict) -> bool:
    """True for `quant_method: compressed-tensors` other than a pure int-quantized (W8A8) config."""
    return quant.get("quant_method") == "compressed-tensors" and not matches_int(quant)


def matches_int(quant: dict) -> bool:
    """True for a compressed-tensors config whose only format is `int-quantized` (W8A8)."""
    return quant.get("quant_method") == "compressed-tensors" and formats_of(quant) == {INT_FORMAT_NAME}


def check_config(quant: dict) -> None:
    """Raise InputError unless the config is pack-quantized integer weights with one bit width
    (other compressed-tensors formats: dense, int-quantized, float, nvfp4, sparse ones)."""
    formats = formats_of(quant)
    if formats != {FORMAT_NAME}:
        raise InputError(f"config.json: compressed-tensors format {', '.join(sorted(map(str, formats))) or 'unset'} is not supported; "
                         f"this toolkit reads {FORMAT_NAME} (int weights packed into int32) and {INT_FORMAT_NAME} (int8 W8A8)")
    weights = weight_schemes(quant)
    if not weights or any(w.get("type", "int") != "int" for w in weights):
        raise InputError("config.json: compressed-tensors config_groups need integer weight schemes (weights.type int)")
    bits = {int(w.get("num_bits", 0)) for w in weights}
    if len(bits) != 1 or not 1 <= next(iter(bits)) <= 8:
        raise InputError(f"config.json: compressed-tensors config_groups declare num_bits {sorted(bits)}; "
                         "one width between 1 and 8 is supported")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise InputError(f"config.json: compressed-tensors sparsity format {sparsity.get('format')!r} is not supported")


def fused(quant: dict) -> dict[str, str]:
    """How a fused linear's pack-quantized tensors split / merge (models/native_map.py):
    weight_packed (packed along the inputs) and per-channel / per-group scales by rows,
    weight_shape as a shape vector, an act-order g_idx alike in every part. A per-tensor scale
    and a zero point (packed along the outputs) are left out: refused."""
    kinds = {"weight_packed": "rows", "weight_shape": "shape", "weight_g_idx": "same", "bias": "rows"}
    if all(w.get("strategy", "channel") in ("channel", "group") for w in weight_schemes(quant)):
        kinds["weight_scale"] = "rows"
    return kinds


def fused_int(quant: dict) -> dict[str, str]:
    """How a fused linear's int-quantized (W8A8) tensors split / merge: the int8 weight by rows,
    per-channel scales and zero points by rows (a per-tensor one is refused)."""
    kinds = {"weight": "rows", "bias": "rows"}
    if all(w.get("strategy", "channel") == "channel" for w in weight_schemes(quant)):
        kinds.update(weight_scale="rows", weight_zero_point="rows")
    return kinds


def check_int_config(quant: dict) -> None:
    """Raise InputError unless an int-quantized config has 8-bit integer weights (what vLLM's
    W8A8 int8 kernels and this toolkit's reader take)."""
    weights = weight_schemes(quant)
    if not weights or any(w.get("type", "int") != "int" or int(w.get("num_bits", 0)) != 8 for w in weights):
        raise InputError("config.json: compressed-tensors int-quantized needs 8-bit integer weight schemes "
                         "(weights.type int, num_bits 8); float (fp8) schemes are not supported")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise InputError(f"config.json: compressed-tensors sparsity format {sparsity.get('format')!r} is not supported")


# -- packing ---------------------------------------------------------------------------------
def _bit_positions(count: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    start = torch.arange(count, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_to_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [rows, cols] (|v| < 2^(bits-1)) -> int32 [rows, ceil(cols x bits / 32)],
    packed along dim 1 the way compressed-tensors' `pack_to_int32` does (offset 2^(bits-1)).

    A meta tensor gives a meta output. Raises ValueError for bits outside 1..8."""
    import torch

    if not 1 <= bits <= 8:
        raise ValueError(f"compressed-tensors packs 1..8 bits, got {bits}")
    rows, cols = values.shape
    words = -(-cols * bits // 32)
    if values.device.type == "meta":
        return torch.empty(rows, words, dtype=torch.int32, device="meta")
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: whole values per word; 32-bit arithmetic, blocks of rows
        out = torch.empty(rows, words, dtype=torch.int32)
        for start in range(0, rows, ROW_BLOCK):  # bounded temporaries, whatever the weight size
            out[start:start + ROW_BLOCK] = _pack_whole_words(values[start:start + ROW_BLOCK], bits)
        return out
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    word, offset = _bit_positions(cols, bits)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.index_add_(1, word, (unsigned << offset) & 0xFFFFFFFF)
    out.index_add_(1, word + 1, unsigned >> (32 - offset))  # the part that straddles into the next word
    out = out[:, :words]
    return (out - (out >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _pack_whole_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_to_int32 for a bit width dividing 32: value k of each word in bits k*bits.., int32 math
    (the top value's shift wraps into the sign bit exactly as the int64 path's two's complement)."""
    import torch

    per = 32 // bits
    shifted = values.to(torch.int32) + (1 << (bits - 1))
    pad = -shifted.shape[1] % per
    if pad:
        shifted = torch.nn.functional.pad(shifted, (0, pad))
    groups = shifted.reshape(shifted.shape[0], -1, per)
    word = groups[..., 0].clone()
    for k in range(1, per):
        word |= groups[..., k] << (k * bits)
    return word


def unpack_from_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """int32 [rows, words] -> signed codes int32 [rows, columns] (the inverse of pack_to_int32)."""
    import torch

    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))
    word, offset = _bit_positions(columns, bits)
    stream = words[:, word] | (words[:, word + 1] << 32)
    return ((stream >> offset) & ((1 << bits) - 1)).to(torch.int32) - (1 << (bits - 1))


def _channel_blocks(weight: torch.Tensor, row_block: int | None):
    """Yield (start, stop, codes, scale) over blocks of rows of a [out, in] weight: scale = row
    absmax / 127 in float32 stored in the weight's dtype [rows, 1], codes = round(W / scale)
    clamped to [-127, 127] as float32 [rows, in] in a buffer reused for the next block."""
    import torch

    rows, cols = weight.shape
    step = block_rows(weight.shape, row_block)
    work = torch.empty(step, cols, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = work[: stop - start].copy_(weight[start:stop])
        scale = (row_absmax(block) / 127.0).to(weight.dtype)
        safe = scale.float().clamp_min(tiny)
        codes = block.div_(safe).round_().clamp_(-127, 127)  # rounded half to even
        yield start, stop, codes, scale


def quantize_symmetric_channel(weight: torch.Tensor, row_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 in [-127, 127], scale [out, 1] in the weight's dtype): W ~ q x scale.

    compressed-tensors' W8A16 per-channel symmetric scheme: scale = row absmax / 127 computed in
    float32 and stored in the weight's dtype, q = round(W / scale), block of rows by block of rows
    (`row_block`, default about BLOCK_ELEMENTS elements) in reused buffers. Meta in, meta out."""
    import torch

    if weight.device.type == "meta":
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], 1, dtype=weight.dtype, device="meta")
    quantized = output_like(weight, torch.int8)  # reused from item to item in a pipeline run
    scales = torch.empty(weight.shape[0], 1, dtype=weight.dtype)
    for start, stop, codes, scale in _channel_blocks(weight, row_block):
        quantized[start:stop].copy_(codes)
        scales[start:stop] = scale
    return quantized, scales


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One float linear weight [out, in] -> the W8A16 tensors of WRITTEN: {weight_packed: int32
    [out, ceil(in / 4)], weight_scale: [out, 1] (weight dtype), weight_shape: int64 [2]}.

    The bytes of pack_to_int32(quantize_symmetric_channel(W), 8), written straight into the packed
    tensor: with 8 bits, word k of a row holds codes 4k..4k+3 + 128 as its little-endian bytes, so
    each block's codes + 128 are stored as uint8 into the packed tensor's bytes (big-endian hosts
    take the packer)."""
    import sys

    import torch

    shape = torch.tensor(list(weight.shape), dtype=torch.int64, device=weight.device)
    if weight.device.type == "meta" or sys.byteorder != "little":
        q, scale = quantize_symmetric_channel(weight)
        return {"weight_packed": pack_to_int32(q, 8), "weight_scale": scale, "weight_shape": shape}
    rows, cols = weight.shape
    words = -(-cols // 4)
    # padding codes are 0 bytes; otherwise every byte is written below (reused from item to item in a pipeline run)
    packed = torch.zeros(rows, words, dtype=torch.int32) if cols % 4 else output_tensor((rows, words), torch.int32)
    code_bytes = packed.view(torch.uint8)[:, :cols]
    scales = torch.empty(rows, 1, dtype=weight.dtype)
    for start, stop, codes, scale in _channel_blocks(weight, None):
        target = code_bytes[start:stop]
        target.view(torch.int8).copy_(codes)
        target.bitwise_xor_(0x80)  # q + 128 (mod 256) of a q in [-127, 127]: [1, 255]
        scales[start:stop] = scale
    return {"weight_packed": packed, "weight_scale": scales, "weight_shape": shape}


def quantize_w8a8(weight: torch.Tensor, row_block: int | None = None) -> dict[str, torch.Tensor]:
    """One float linear weight [out, in] -> the int-quantized tensors of INT_WRITTEN: {weight: int8
    [out, in], weight_scale: float32 [out, 1]}, W ~ weight x weight_scale.

    Per-channel symmetric: q = round(W x 127 / row absmax) computed in float32, scale = absmax / 127
    (float32, the dtype vLLM's W8A8 kernels keep). The codes equal bitsandbytes' LLM.int8() codes
    (`--format bnb`) for every weight float16 holds exactly. An all-zero row gets codes 0, scale 0.
    Blocks of `row_block` rows (default about BLOCK_ELEMENTS elements), buffers reused. Meta in,
    meta out."""
    import torch

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    if weight.device.type == "meta":
        return {"weight": torch.empty(weight.shape, dtype=torch.int8, device="meta"),
                "weight_scale": torch.empty(weight.shape[0], 1, dtype=torch.float32, device="meta")}
    rows, cols = weight.shape
    quantized = output_like(weight, torch.int8)  # reused from item to item in a pipeline run
    scales = torch.empty(rows, 1, dtype=torch.float32)
    step = block_rows(weight.shape, row_block)
    work = torch.empty(step, cols, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = work[: stop - start].copy_(weight[start:stop])
        absmax = row_absmax(block)
        factor = 127.0 / absmax.clamp_min(tiny)
        quantized[start:stop].copy_(block.mul_(factor).round_().clamp_(-127, 127))
        scales[start:stop] = absmax / 127.0
    return {"weight": quantized, "weight_scale": scales}


def packed_shapes(rows: int, cols: int, bits: int, groups: int, scale_dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and safetensors dtypes of WRITTEN for a [rows, cols] linear with `groups` scales
    per row (1: per channel) stored as `scale_dtype` (a safetensors dtype such as "BF16")."""
    return {"weight_packed": ((rows, -(-cols * bits // 32)), "I32"), "weight_scale": ((rows, groups), scale_dtype),
            "weight_shape": ((2,), "I64")}


def pack_codes(signed: torch.Tensor, scales: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Symmetric signed codes [out, in] (|q| <= 2^(bits-1)) and scales [out, groups] (float, already
    exact in `scale_dtype`) -> the tensors of WRITTEN; W = q x scale per group of in / groups columns."""
    import torch

    return {"weight_packed": pack_to_int32(signed, bits), "weight_scale": scales.to(scale_dtype).contiguous(),
            "weight_shape": torch.tensor(list(signed.shape), dtype=torch.int64)}


# -- reading ---------------------------------------------------------------------------------
def count(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Parameters a tensor stands for: `weight_packed` x 32 / bits (exact when `in` is a multiple
    of 32 / bits), `weight` / `bias` element by element, scales, zero points, shape, g_idx 0."""
    if param == "weight_packed":
        return plain_count(param, shape, quant) * 32 // scheme(quant)["num_bits"]
    if param in ("weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"):
        return 0
    return plain_count(param, shape, quant)


def weight_shape(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of a linear: the `weight_shape` tensor when `read(param)` can fetch it, else
    the packed width x 32 / bits (an upper bound by less than 32 / bits)."""
    if read is not None and "weight_shape" in specs:
        out, cols = (int(v) for v in read("weight_shape").tolist())
        return out, cols
    rows, words = specs["weight_packed"].shape
    return rows, words * 32 // scheme(quant)["num_bits"]


def dequantize(tensors: Mapping[str, torch.Tensor], quant: dict) -> torch.Tensor:
    """{weight_packed, weight_scale, weight_shape[, weight_zero_point, weight_g_idx]} of one
    linear -> float32 weight [out, in] = (q - zero_point) x scale, per channel, group or tensor.

    Raises InputError when the scale's shape fits none of these."""
    import torch

    info = scheme(quant)
    bits = info["num_bits"]
    out, cols = (int(v) for v in tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], bits, cols).float()
    scale = tensors["weight_scale"].float()
    scale = scale.reshape(1, 1) if scale.dim() < 2 else scale
    zero = tensors.get("weight_zero_point")
    zero = torch.zeros_like(scale) if zero is None else unpack_from_int32(zero.T.contiguous(), bits, scale.shape[0]).T.float()
    if scale.shape[0] not in (1, out):
        raise InputError(f"weight_scale of shape {list(tensors['weight_scale'].shape)} does not fit a weight of {out} rows")
    if scale.shape[1] > 1:  # groups along the input axis
        g_idx = tensors.get("weight_g_idx")
        if g_idx is None or (g_idx < 0).any():
            size = info["group_size"] or -(-cols // scale.shape[1])
            g_idx = torch.arange(cols) // size
        g = g_idx.long()
        scale, zero = scale[:, g], zero[:, g]
    return (q - zero) * scale


def count_int(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Parameters a tensor of an int-quantized checkpoint stands for: `weight` (int8 or float) and
    `bias` element by element, scales and zero points 0."""
    if param in ("weight_scale", "weight_zero_point"):
        return 0
    return plain_count(param, shape, quant)


def weight_shape_int(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of an int-quantized linear: its int8 `weight` has the float weight's shape."""
    rows, cols = specs["weight"].shape
    return rows, cols


def dequantize_int(tensors: Mapping[str, torch.Tensor], quant: dict) -> torch.Tensor:
    """{weight: int8 [out, in], weight_scale[, weight_zero_point]} of one int-quantized linear ->
    float32 weight [out, in] = (q - zero_point) x scale, per tensor, channel or group.

    Raises InputError when the scale's shape fits none of these."""
    import torch

    q = tensors["weight"].float()
    out, cols = q.shape
    scale = tensors["weight_scale"].float()
    scale = scale.reshape(1, 1) if scale.dim() < 2 else scale
    zero = tensors.get("weight_zero_point")
    zero = torch.zeros_like(scale) if zero is None else zero.float().reshape(scale.shape)
    if scale.shape[0] not in (1, out) or cols % scale.shape[1]:
        raise InputError(f"weight_scale of shape {list(tensors['weight_scale'].shape)} does not fit a weight of shape {[out, cols]}")
    if scale.shape[1] > 1:  # groups along the input axis
        size = cols // scale.shape[1]
        scale, zero = scale.repeat_interleave(size, dim=1), zero.repeat_interleave(size, dim=1)
    return (q - zero) * scale


# -- writing ---------------------------------------------------------------------------------
def quantization_config(skip_modules: Sequence[str], layout: str = "original", *, bits: int = 8,
                        group_size: int | None = None, symmetric: bool = True) -> dict:
    """quantization_config of a pack-quantized checkpoint (weights only, activations in float).

    Default W8A16 per channel; `group_size` makes it per group (e.g. W4A16: bits=4, 128).
    `skip_modules`: modules left in float, in the layout's names; written as `ignore` rules that
    transformers and vLLM both match (towers as `re:.*vision_tower.*`). Raises ValueError for an
    unknown layout."""
    check_layout_name(layout)
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT_NAME,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                            "strategy": "group" if group_size else "channel", "group_size": group_size,
                            "dynamic": False, "actorder": None, "observer": "minmax"},
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT_NAME,
            }
        },
        "ignore": ignore_rules(skip_modules, layout),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def w8a8_quantization_config(skip_modules: Sequence[str], layout: str = "original") -> dict:
    """quantization_config of an int-quantized W8A8 checkpoint: int8 weights per channel
    (symmetric, static) and int8 activations per token (symmetric, dynamic), what llm-compressor's
    W8A8 INT8 scheme writes and vLLM runs with int8 GEMMs. `skip_modules` as in
    `quantization_config`. Raises ValueError for an unknown layout."""
    quant = quantization_config(skip_modules, layout)
    group = quant["config_groups"]["group_0"]
    group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "group_size": None, "dynamic": True, "actorder": None, "observer": None}
    group["format"] = quant["format"] = INT_FORMAT_NAME
    return quant


def to_native(quant: dict, record=None) -> dict:
    """An original-layout config with its `ignore` rules rewritten for the native layout
    (`record`: the LLM's dialect, for its linears' native names).

    Raises InputError for a rule that cannot be rewritten (a regex over LLM modules)."""
    ignore = [rule for entry in quant.get("ignore") or [] for rule in native_rule(entry, record)]
    return dict(quant, ignore=list(dict.fromkeys(ignore)))


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """A native-layout config with its `ignore` rules naming the original layout's modules
    (`modules`: {native linear module: original one}; formats/rules.py). Raises InputError."""
    rules = quant.get("ignore") or []
    kept = original_modules(modules, lambda native: ignored_by_rule(native, rules))
    routers = [r for r in rules if r.startswith("re:") and r[3:] in router_rules()]  # the same in both layouts
    return dict(quant, ignore=ignore_rules(kept, "original") + routers)


FORMAT = Format(
    name="compressed_tensors", library="compressed-tensors (llm-compressor, vLLM)", quant_method="compressed-tensors",
    params=PARAMS, required=("weight_packed", "weight_scale", "weight_shape"), marker="weight_packed", matches=matches,
    check_config=check_config, count=count, weight_shape=weight_shape, dequantize=dequantize, to_native=to_native,
    to_original=to_original, fused=fused,
)
INT8_FORMAT = Format(
    name="compressed_tensors_int8", library="compressed-tensors int-quantized W8A8 (llm-compressor, vLLM)",
    quant_method="compressed-tensors", params=INT_PARAMS, required=("weight", "weight_scale"), marker="weight_scale",
    matches=matches_int, check_config=check_int_config, count=count_int, weight_shape=weight_shape_int,
    dequantize=dequantize_int, to_native=to_native, to_original=to_original, fused=fused_int,
)
