"""GPTQ peak memory on the wide InternVL2-Llama3-76B-shaped checkpoint (true widths, 2 layers).

Peak RSS should be about 1 GiB + a small multiple of one decoder layer + the calibration
activations, never the whole LLM. Run: python benchmarks/bench_gptq_memory.py [--samples 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, folder_bytes, fresh, markdown_table, timed, wide_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    src = wide_checkpoint()
    from internvl_tools.models.layout import build_layout
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(src) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        layer = sum(reader.spec(k).nbytes for k in layout.llm_layer_keys(0))
        llm = sum(reader.spec(k).nbytes for k, i in layout.keys.items() if i.family == "llm")
    hidden = config["llm_config"]["hidden_size"]
    activations = args.samples * args.seq_len * hidden * 4
    out = fresh(WORK / "gptq-wide")
    seconds, rss = timed([sys.executable, "-m", "internvl_tools", "quantize", str(src), "-o", str(out), "--method", "gptq",
                          "--num-samples", str(args.samples), "--seq-len", str(args.seq_len), "--json"])
    written = folder_bytes(out)
    fresh(out)
    print(f"wide InternVL2-Llama3-76B-shaped checkpoint ({folder_bytes(src) / GIB:.2f} GiB, 2 decoder layers of "
          f"{layer / GIB:.2f} GiB bf16); {args.samples} samples x {args.seq_len} tokens")
    print(markdown_table(
        ["run", "seconds", "output GiB", "peak RSS GiB", "one layer bf16 GiB", "activations GiB", "whole LLM of the real 76B GiB"],
        [["quantize --method gptq (w4 g128)", f"{seconds:.0f}", f"{written / GIB:.2f}", f"{rss / GIB:.2f}", f"{layer / GIB:.2f}",
          f"{activations / GIB:.3f}", f"{(llm + 78 * layer) / GIB:.0f}"]]))


if __name__ == "__main__":
    main()
