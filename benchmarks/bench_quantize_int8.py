"""int8 quantization math side by side with bitsandbytes' own kernel (LLM.int8() row-wise codes
of one Llama-3-70B MLP weight, 8192 x 28672 bf16; the codes and scales are asserted equal).
`quantize --method int8` against cp + sync of the same bytes is bench_streaming.py's table.

Run: python benchmarks/bench_quantize_int8.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402


def math_speed() -> list[list[str]]:
    """Seconds to quantize one 8192 x 28672 bf16 weight (a Llama-3-70B MLP matrix)."""
    import torch

    from internvl_tools.formats.bnb_int8 import quantize_rowwise

    weight = torch.randn(8192, 28672).to(torch.bfloat16)
    rows = []
    started = time.perf_counter()
    ours = quantize_rowwise(weight)
    rows.append(["internvl_tools.formats.bnb_int8.quantize_rowwise", f"{time.perf_counter() - started:.2f}"])
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return rows
    started = time.perf_counter()
    theirs = F.int8_vectorwise_quant(weight.to(torch.float16))
    rows.append(["bitsandbytes int8_vectorwise_quant (fp16 copy included)", f"{time.perf_counter() - started:.2f}"])
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), "bytes differ from bitsandbytes"
    return rows


def main() -> None:
    print(markdown_table(["int8 math on one 8192 x 28672 weight", "seconds"], math_speed()))


if __name__ == "__main__":
    main()
