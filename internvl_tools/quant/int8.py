"""LLM.int8() row-wise weight quantization, byte-identical to bitsandbytes' own.

bitsandbytes quantizes a weight by casting it to float16, taking each row's absmax (fp32
"SCB") and rounding W * 127 / absmax to int8. This re-statement does the same operations in
the same dtypes, block of rows by block of rows, so memory stays at a few x one block and the
bytes equal what `load_in_8bit=True` produces.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 1024
WEIGHT_FORMAT_ROW = 0  # bitsandbytes' code for the "row" layout


def quantize_rowwise(weight: torch.Tensor, row_block: int = ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], fp32 row absmax [out])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    if weight.device.type == "meta":
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
    rows = weight.shape[0]
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, row_block):
        block = weight[start : start + row_block].to(torch.float16)
        absmax = block.abs().amax(dim=1).float()
        quantized[start : start + row_block] = torch.round(block * (127.0 / absmax.unsqueeze(-1))).to(torch.int8)
        scales[start : start + row_block] = absmax
    return quantized, scales


def dequantize_rowwise(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 weight and row absmax back to float32 (W ~ q * absmax / 127)."""
    return quantized.float() * (scales.unsqueeze(-1) / 127.0)


def weight_format() -> torch.Tensor:
    """The `weight_format` tensor bitsandbytes stores next to each int8 weight."""
    return torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)
