"""`verify` speed and memory: samples per second and peak RSS on a tiny model and on a small
real-weight model (SmolLM2-135M inside an InternVL checkpoint, against its GPTQ copy).

Needs bench-work/smolvl and bench-work/smolvl-gptq from bench_gptq_smollm2.py for the second row.
Run: python benchmarks/bench_verify.py [--items 12]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, markdown_table, run, timed  # noqa: E402


def make_slice(path: Path, count: int) -> Path:
    from internvl_tools.io.slices import BenchItem, write_tsv
    from internvl_tools.calibrate.samples import draw_image

    rng = random.Random(0)
    items = []
    for i in range(count):
        image, color, shape = draw_image(rng)
        options = {"A": "circle", "B": "square", "C": "triangle", "D": "rectangle"}
        answer = next(k for k, v in options.items() if v == shape)
        items.append(BenchItem(str(i), "Which shape is in the image?", answer, image, options, shape) if i % 2 == 0
                     else BenchItem(str(i), f"Is the main object {color}?", "yes", image, {}, "color"))
    return write_tsv(items, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=12)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    bench = make_slice(WORK / "verify-slice.tsv", args.items)
    tiny = WORK / "verify-tiny"
    if not (tiny / "config.json").exists():
        run([sys.executable, "-m", "internvl_tools", "make-tiny", "InternVL2-2B", str(tiny)])
    pairs = [("tiny InternVL2-2B layout vs itself", tiny, tiny)]
    if (WORK / "smolvl-gptq" / "config.json").exists():
        pairs.append(("SmolLM2-135M InternVL vs its GPTQ w4 copy", WORK / "smolvl", WORK / "smolvl-gptq"))
    rows = []
    for label, ref, cand in pairs:
        seconds, rss = timed([sys.executable, "-m", "internvl_tools", "verify", str(ref), str(cand), "--bench", str(bench),
                              "--limit", str(args.items), "--min-top1", "0", "--max-kl", "100", "--min-image-cosine", "0",
                              "--json", str(WORK / "verify-report.json")])
        rows.append([label, str(args.items), f"{seconds:.1f}", f"{args.items / seconds:.2f}", f"{rss / GIB:.2f}"])
    print(markdown_table(["run (both models, greedy, 16 new tokens)", "items", "seconds", "samples / s", "peak RSS GiB"], rows))


if __name__ == "__main__":
    main()
