"""`convert --to hf` and back on the wide InternVL2-Llama3-76B-shaped checkpoint: time vs cp, peak RSS.

Run: python benchmarks/bench_convert.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, cp_weights, folder_bytes, fresh, markdown_table, timed, wide_checkpoint  # noqa: E402


def main() -> None:
    src = wide_checkpoint()
    total = folder_bytes(src)
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(src) as reader:
        largest = max(s.nbytes for s in reader.specs())
    hf, back, copy = WORK / "convert-hf", WORK / "convert-back", WORK / "convert-cp"
    rows = []
    cp_seconds, _ = timed(cp_weights(src, fresh(copy)))
    fresh(copy)
    runs = {
        "convert --to hf": [sys.executable, "-m", "internvl_tools", "convert", str(src), "-o", str(fresh(hf)), "--json"],
        "convert --to original": [sys.executable, "-m", "internvl_tools", "convert", str(hf), "-o", str(fresh(back)), "--to", "original", "--json"],
    }
    for label, cmd in runs.items():
        seconds, rss = timed(cmd)
        rows.append([label, f"{total / GIB:.2f}", f"{seconds:.1f}", f"{cp_seconds / seconds:.2f}x", f"{rss / GIB:.2f}",
                     f"{(GIB + 2 * largest) / GIB:.2f}"])
    fresh(hf)
    fresh(back)
    print(f"wide InternVL2-Llama3-76B-shaped checkpoint, {total / GIB:.2f} GiB; cp + sync took {cp_seconds:.1f} s")
    print(markdown_table(["command", "GiB", "seconds", "vs cp", "peak RSS GiB", "bound GiB"], rows))


if __name__ == "__main__":
    main()
