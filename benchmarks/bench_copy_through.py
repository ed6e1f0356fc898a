"""Copy-through throughput vs `cp` and peak RSS on a wide InternVL2-Llama3-76B-shaped checkpoint.

Rows:
- cp + sync of the same weight files (the yardstick)
- `internvl-tools shard` (byte ranges copied in the kernel)
- reader -> writer through in-memory tensors (the path every transforming command uses)

Run: python benchmarks/bench_copy_through.py [--repeat 2] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, cp_weights, folder_bytes, fresh, markdown_table, timed, wide_checkpoint  # noqa: E402

TENSOR_COPY = """
import sys
from pathlib import Path
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.io.writer import CheckpointWriter, parse_size
src, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), parse_size(sys.argv[3])
with CheckpointReader(src) as reader, CheckpointWriter(out, reader.specs(), max_shard_size=limit, inputs=[src]) as writer:
    for name in reader.keys():
        writer.write(name, reader.get(name))
    writer.finalize(side_files_from=src)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args()
    src = wide_checkpoint()
    total = folder_bytes(src)
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(src) as reader:
        largest = max(s.nbytes for s in reader.specs())
    bound = GIB + 2 * largest
    out = WORK / "copy-out"
    commands = {
        "cp + sync (yardstick)": cp_weights(src, out),
        "internvl-tools shard": [sys.executable, "-m", "internvl_tools", "shard", str(src), "-o", str(out),
                                 "--max-shard-size", args.max_shard_size, "--json"],
        "reader -> tensors -> writer": [sys.executable, "-c", TENSOR_COPY, str(src), str(out), args.max_shard_size],
    }
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeat):
        for label, cmd in commands.items():
            fresh(out)
            seconds, rss = timed(cmd)
            if label not in best or seconds < best[label][0]:
                best[label] = (seconds, max(rss, best.get(label, (0, 0))[1]))
    fresh(out)
    cp_seconds = best["cp + sync (yardstick)"][0]
    rows = []
    for label, (seconds, rss) in best.items():
        rows.append([label, f"{total / GIB:.2f}", f"{seconds:.2f}", f"{total / seconds / 1e6:.0f}",
                     f"{cp_seconds / seconds:.2f}x", f"{rss / GIB:.2f}", f"{bound / GIB:.2f}", "yes" if rss <= bound else "NO"])
    print(f"wide InternVL2-Llama3-76B-shaped checkpoint: {total / GIB:.2f} GiB, largest tensor {largest / GIB:.2f} GiB, best of {args.repeat}")
    print(markdown_table(["path", "GiB", "seconds", "MB/s", "vs cp", "peak RSS GiB", "bound GiB (1 GiB + 2 x largest)", "within"], rows))


if __name__ == "__main__":
    main()
