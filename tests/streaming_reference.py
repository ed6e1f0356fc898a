"""The streaming kernels and the serial transform loop as they were before the pipeline (commit
86a5f97), kept verbatim as the reference the new code must equal byte for byte
(tests/test_streaming_pipeline.py). Whole-block float32 temporaries, one tensor at a time."""

from __future__ import annotations

import torch

from internvl_tools.errors import InputError
from internvl_tools.formats.compressed_tensors import pack_to_int32


def quantize_rowwise(weight, row_block: int = 256):
    """formats/bnb_int8.py quantize_rowwise before the pipeline."""
    rows = weight.shape[0]
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, row_block):
        block = weight[start : start + row_block].to(torch.float16)
        absmax = block.abs().amax(dim=1).float()
        scaled = block.float().mul_(127.0 / absmax.unsqueeze(-1)).round_()  # fp16 x fp32 is computed in fp32
        quantized[start : start + row_block] = scaled.to(torch.int8)
        scales[start : start + row_block] = absmax
    return quantized, scales


def bnb_quantize(weight):
    q, scb = quantize_rowwise(weight)
    return {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def quantize_symmetric_channel(weight, row_block: int = 256):
    """formats/compressed_tensors.py quantize_symmetric_channel before the pipeline."""
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], 1, dtype=weight.dtype)
    for start in range(0, weight.shape[0], row_block):
        block = weight[start : start + row_block].float()
        scale = (block.abs().amax(dim=1, keepdim=True) / 127.0).to(weight.dtype)
        safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
        quantized[start : start + row_block] = block.div_(safe).round_().clamp_(-127, 127).to(torch.int8)
        scales[start : start + row_block] = scale
    return quantized, scales


def ct_quantize(weight):
    q, scale = quantize_symmetric_channel(weight)
    return {"weight_packed": pack_to_int32(q, 8), "weight_scale": scale,
            "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def quantize_w8a8(weight, row_block: int = 256):
    """formats/compressed_tensors.py quantize_w8a8 before the pipeline."""
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], 1, dtype=torch.float32)
    for start in range(0, weight.shape[0], row_block):
        block = weight[start : start + row_block].float()
        absmax = block.abs().amax(dim=1, keepdim=True)
        factor = 127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)
        quantized[start : start + row_block] = block.mul_(factor).round_().clamp_(-127, 127).to(torch.int8)
        scales[start : start + row_block] = absmax / 127.0
    return {"weight": quantized, "weight_scale": scales}


def blocked_merge(weight, ops, sources, key: str):
    """transforms/merge_lora.py _blocked before the pipeline (blocks of 2048 rows)."""
    factors = []
    for op in ops:
        a, b = sources.get(op.source, op.a).float(), sources.get(op.source, op.b).float()
        factors.append((a, b, op.scale, op.kind == "embedding"))
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], 2048):
        block = weight[start : start + 2048].float()
        stop = start + block.shape[0]
        for a, b, scale, transposed in factors:
            update = (a[:, start:stop].T @ b.T) if transposed else (b[start:stop] @ a)
            block = block + update * scale
        if not torch.isfinite(block).all():
            raise InputError(f"merging LoRA into {key!r} gives NaN or Inf (rows {start}..{stop}); the adapter is broken or its alpha is wrong")
        out[start:stop] = block.to(weight.dtype)
    return out


def serial_run(view, writer, items, *, budget: int, progress=None) -> None:
    """transforms/stream.py run_transform's loop before the pipeline: each output read, computed
    and written in turn (a source read once per output), unchanged tensors copied."""
    for item in items:
        if item.stored is not None:
            writer.copy_stored(item.outputs[0][0], item.stored)
        else:
            for name, fn in item.outputs:
                tensors = [view.get(s) for s in item.sources]
                writer.write(name, (tensors[0] if fn is None else fn(*tensors)).contiguous())
        if progress:
            progress(item.input_bytes)
