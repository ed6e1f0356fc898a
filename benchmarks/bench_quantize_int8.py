"""`quantize --method int8` on the wide InternVL2-Llama3-76B-shaped checkpoint: throughput vs cp,
peak RSS, and the quantization math side by side with bitsandbytes' own kernel.

Run: python benchmarks/bench_quantize_int8.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, cp_weights, folder_bytes, fresh, markdown_table, timed, wide_checkpoint  # noqa: E402


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
    src = wide_checkpoint()
    total = folder_bytes(src)
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(src) as reader:
        largest = max(s.nbytes for s in reader.specs())
    out, copy = WORK / "int8-out", WORK / "int8-cp"
    best_cp = best_q = None
    rss = 0
    for _ in range(2):
        seconds, _ = timed(cp_weights(src, fresh(copy)))
        best_cp = min(best_cp or seconds, seconds)
        fresh(copy)
        seconds, peak = timed([sys.executable, "-m", "internvl_tools", "quantize", str(src), "-o", str(fresh(out)),
                               "--method", "int8", "--json"])
        best_q, rss = min(best_q or seconds, seconds), max(rss, peak)
    written = folder_bytes(out)
    fresh(out)
    print(f"wide InternVL2-Llama3-76B-shaped checkpoint, {total / GIB:.2f} GiB in, {written / GIB:.2f} GiB out; best of 2")
    print(markdown_table(["run", "seconds", "vs cp + sync of the input", "peak RSS GiB", "bound GiB (1 GiB + 2 x largest)"], [
        ["cp + sync", f"{best_cp:.1f}", "1.00x", "-", "-"],
        ["quantize --method int8", f"{best_q:.1f}", f"{best_cp / best_q:.2f}x", f"{rss / GIB:.2f}", f"{(GIB + 2 * largest) / GIB:.2f}"],
    ]))
    print()
    print(markdown_table(["int8 math on one 8192 x 28672 weight", "seconds"], math_speed()))


if __name__ == "__main__":
    main()
