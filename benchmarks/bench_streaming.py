"""Every streaming command against cp + sync on a wide checkpoint (issue 18 item 3, issue 14 item 6),
optionally side by side with another copy of the code (the no-regression check of a refactor).

Builds, once, the wide checkpoint of --family (benchmarks/common.py wide_checkpoint(): true widths,
2 layers per tower; InternVL2-Llama3-76B ~7.9 GiB, InternVL2.5-78B, InternVL3.5-30B-A3B (MoE)),
a PEFT adapter with r = 16 on every LLM linear (for merge-lora --adapter), a copy with LoRA
r = 16 embedded in the LLM and the vision tower (for merge-lora of embedded LoRA) and a converted
copy in the transformers-native layout (for convert --to original), then runs in N interleaved
rounds (round robin over the commands, never all repeats of one command in a row):

- cp + sync of the weight files of each input (the yardstick of the commands reading that input:
  the same bytes read, and written, flushed to disk; run just before them in every round)
- shard
- quantize --method int8 (bnb layout), --format compressed-tensors (W8A16), --format w8a8
- merge-lora --adapter (PEFT, r = 16) and merge-lora of the embedded LoRA (r = 16)
- convert --to hf
- convert --to original (of the converted copy)

and prints, per command, the MEDIAN wall time, the ratio to cp's median (cp seconds / command
seconds: higher is better, 1.0 = disk speed; every command fsyncs its shards, as cp + sync does),
the bytes written, the peak RSS (GNU time in a child) and the bound 1 GiB + 2 x largest tensor.
With --compare-with DIR every internvl-tools command also runs with the code in DIR (cwd=DIR,
PYTHONPATH=DIR; same input, same output disk, in the same rounds, the order of the two
alternating from round to round) and both columns are printed with the change in %. A command
that fails prints "n/a" (e.g. one the other code does not support). --only keeps the commands
whose label contains one of the words given.

Outputs go to WORK/streaming-scratch/ (deleted between runs). The machine's load (1-minute load
average before/after and per round), nproc, the date and free disk are printed with the table.
--remove-inputs deletes what this run built (checkpoint, adapter, LoRA and converted copies)
at the end; inputs that existed before are kept.

Run: python benchmarks/bench_streaming.py [--repeat 3] [--family InternVL2.5-78B] [--llm-layers 6] [--only int8 merge]
     [--compare-with /tmp/base] [--remove-inputs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, ROOT, WORK, cp_weights, folder_bytes, fresh, markdown_table, wide_checkpoint, wide_suffix  # noqa: E402

TIMEOUT_S = 3600


def largest_tensor(folder: Path) -> int:
    """Bytes of the largest tensor, read from the safetensors headers (independent of either code)."""
    largest = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                largest = max(largest, end - begin)
    return largest


def code_env(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code)
    return env


def imported_from(code: Path) -> str:
    """Where `import internvl_tools` resolves with cwd=code, PYTHONPATH=code (the evidence of which code ran)."""
    proc = subprocess.run([sys.executable, "-c", "import internvl_tools; print(internvl_tools.__file__)"],
                          cwd=code, env=code_env(code), capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def git_state(code: Path) -> str:
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--", "internvl_tools"],
                           capture_output=True, text=True).stdout.splitlines()
    return f"{head or '?'}" + (f" + {len(dirty)} uncommitted file(s) under internvl_tools/" if dirty else " (clean)")


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, int] | str:
    """(wall seconds, peak RSS bytes) of one command by GNU time, or the error text when it failed."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        # GNU time's own last lines ("Command exited with non-zero status", the %M) are noise
        lines = [line for line in lines if not line.startswith("Command exited") and not line.strip().isdigit()]
        return " | ".join(lines[-3:]) or f"exit {proc.returncode}"
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GIB


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--compare-with", type=Path, help="another copy of the code (e.g. a git worktree of the old commit)")
    parser.add_argument("--family", default="InternVL2-Llama3-76B", help="make-tiny family of the wide checkpoint "
                        "(InternVL2-Llama3-76B, InternVL2.5-78B, InternVL3.5-30B-A3B, ...)")
    parser.add_argument("--llm-layers", type=int, default=2, help="LLM decoder layers of the wide checkpoint (make-tiny "
                        "--llm-layers; default 2): a deeper one weighs the fixed start-up cost as a real checkpoint does")
    parser.add_argument("--only", nargs="+", default=None, help="run only the commands whose label contains one of these words")
    parser.add_argument("--remove-inputs", action="store_true", help="delete the inputs this run built when it ends")
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    free_before = free_gib(WORK)
    codes = {"new": ROOT}
    if args.compare_with:
        codes["old"] = args.compare_with.resolve()
    where = {side: imported_from(code) for side, code in codes.items()}
    for side, code in codes.items():
        if not Path(where[side]).resolve().is_relative_to(code):
            raise SystemExit(f"{side} code: internvl_tools imports from {where[side]}, not from {code}")

    # inputs, built once (with this checkout's code)
    built: list[Path] = []
    stem = f"{args.family}-wide{wide_suffix(args.llm_layers)}"
    src = WORK / stem
    if not (src / "config.json").exists():
        built.append(src)
    src = wide_checkpoint(args.family, llm_layers=args.llm_layers)
    total = folder_bytes(src)
    largest = largest_tensor(src)
    bound = GIB + 2 * largest
    adapter = WORK / f"{stem}-adapter-r16"
    embedded = WORK / f"{stem}-lora-r16"
    converted = WORK / f"{stem}-hf"
    scratch = WORK / "streaming-scratch"
    out = scratch / "out"
    tool = [sys.executable, "-m", "internvl_tools"]
    commands: dict[str, list[str]] = {
        "shard": ["shard", str(src), "-o", str(out), "--json"],
        "quantize --method int8 (bnb)": ["quantize", str(src), "-o", str(out), "--method", "int8", "--json"],
        "quantize --method int8 --format compressed-tensors (W8A16)": ["quantize", str(src), "-o", str(out), "--method", "int8",
                                                                       "--format", "compressed-tensors", "--json"],
        "quantize --method int8 --format w8a8": ["quantize", str(src), "-o", str(out), "--method", "int8", "--format", "w8a8", "--json"],
        "merge-lora --adapter (PEFT, r 16 on every LLM linear)": ["merge-lora", str(src), "--adapter", str(adapter), "-o", str(out), "--json"],
        "merge-lora (embedded LoRA, r 16 in the LLM and the vision tower)": ["merge-lora", str(embedded), "-o", str(out), "--json"],
        "convert --to hf": ["convert", str(src), "-o", str(out), "--to", "hf", "--json"],
        "convert --to original (of the converted copy)": ["convert", str(converted), "-o", str(out), "--to", "original", "--json"],
    }
    if args.only:
        commands = {label: argv for label, argv in commands.items() if any(word in label for word in args.only)}
    needs = {path for path in (adapter, embedded, converted) if any(str(path) in argv for argv in commands.values())}
    missing = [path for path in (embedded, converted) if path in needs and not (path / "config.json").exists()]
    need = (len(missing) + 1) * total + 2 * GIB  # the copies to build + one output at a time (+ its .partial slack)
    if free_gib(WORK) * GIB < need:
        raise SystemExit(f"not enough disk under {WORK}: {free_gib(WORK):.1f} GiB free, need ~{need / GIB:.1f} GiB")
    if adapter in needs and not (adapter / "adapter_config.json").exists():
        from internvl_tools.tiny.generator import make_peft_adapter

        built.append(adapter)
        make_peft_adapter(src, adapter, rank=16, alpha=32)
    if embedded in needs and not (embedded / "config.json").exists():
        built.append(embedded)
        fresh(embedded)
        subprocess.run([sys.executable, "-m", "internvl_tools", "make-tiny", args.family, str(embedded), "--wide", "--lora", "embedded",
                        "--rank", "16", "--shards", "3",
                        *(["--llm-layers", str(args.llm_layers)] if args.llm_layers != 2 else [])], cwd=ROOT, env=code_env(ROOT), check=True, capture_output=True)
    if converted in needs and not (converted / "config.json").exists():
        built.append(converted)
        fresh(converted)
        subprocess.run([sys.executable, "-m", "internvl_tools", "convert", str(src), "-o", str(converted), "--to", "hf", "--json"],
                       cwd=ROOT, env=code_env(ROOT), check=True, capture_output=True)
    fresh(scratch)
    # each command's yardstick is cp + sync of ITS input (the same bytes read), run just before the
    # commands reading that input in every round, so that each finds the page cache as they do
    def input_of(argv: list[str]) -> Path:
        return next(path for path in (embedded, converted, src) if str(path) in argv)

    inputs = list(dict.fromkeys(input_of(argv) for argv in commands.values()))
    yardstick = {path: f"cp + sync of {path.name} (yardstick)" for path in inputs}
    results: dict[tuple[str, str], list] = {}  # (label, side) -> [(seconds, rss) | error str]
    round_loads = []
    written: dict[str, int] = {yardstick[path]: folder_bytes(path) for path in inputs}  # label -> bytes of weights written
    for round_no in range(args.repeat):
        round_loads.append(load1())
        sides = list(codes) if round_no % 2 == 0 else list(reversed(codes))
        for label, argv in [item for path in inputs for item in [(yardstick[path], None)] + [
                (label, argv) for label, argv in commands.items() if input_of(argv) == path]]:
            if argv is None:
                fresh(out)
                path = next(p for p, name in yardstick.items() if name == label)
                results.setdefault((label, "-"), []).append(timed(cp_weights(path, out), cwd=ROOT))
                fresh(out)
                continue
            for side in sides:
                fresh(out)
                result = timed(tool + argv, cwd=codes[side], env=code_env(codes[side]))
                results.setdefault((label, side), []).append(result)
                if isinstance(result, tuple) and (out / "config.json").exists():
                    written[label] = folder_bytes(out)
                fresh(out)
                status = f"{result[0]:.1f} s, {result[1] / GIB:.2f} GiB" if isinstance(result, tuple) else f"FAILED: {result}"
                print(f"[round {round_no + 1}/{args.repeat}] {label} [{side}]: {status}", file=sys.stderr, flush=True)
        round_loads[-1] = (round_loads[-1], load1())
    fresh(scratch)
    load_after = os.getloadavg()
    if args.remove_inputs:
        for path in built:
            fresh(path)

    def summary(label: str, side: str) -> tuple[float, int, list[float]] | None:
        runs = results.get((label, side), [])
        ok = [r for r in runs if isinstance(r, tuple)]
        if not ok or len(ok) < len(runs):  # any failure: n/a
            return None
        return statistics.median(r[0] for r in ok), max(r[1] for r in ok), [r[0] for r in ok]

    cp_medians = {}
    for path, label in yardstick.items():
        cp = summary(label, "-")
        if cp is None:
            raise SystemExit(f"cp failed: {results[(label, '-')]}")
        cp_medians[label] = cp[0]

    def cells(s, cp_median: float) -> list[str]:
        if s is None:
            return ["n/a", "n/a", "n/a", "n/a"]
        return [f"{s[0]:.1f}", "/".join(f"{x:.1f}" for x in s[2]), f"{cp_median / s[0]:.2f}x", f"{s[1] / GIB:.2f}"]

    def pct(new: float, old: float) -> str:
        return f"{(new - old) / old * 100:+.1f}%"

    compare = "old" in codes
    header = ["command", "GiB written", "new median s", "new runs s", "new vs cp", "new peak RSS GiB"]
    if compare:
        header += ["old median s", "old runs s", "old vs cp", "old peak RSS GiB", "change in vs cp", "change in RSS"]
    header += ["bound GiB", "within"]
    rows = []
    failures = []
    for path in inputs:
        cp_label = yardstick[path]
        cp_median = cp_medians[cp_label]
        rows.append([cp_label, f"{written[cp_label] / GIB:.2f}", *cells(summary(cp_label, "-"), cp_median)]
                    + (["", "", "", "", "", ""] if compare else []) + ["-", "-"])
        for label in [label for label, argv in commands.items() if input_of(argv) == path]:
            new = summary(label, "new")
            row = [label, f"{written[label] / GIB:.2f}" if label in written else "n/a", *cells(new, cp_median)]
            if compare:
                old = summary(label, "old")
                row += cells(old, cp_median)
                if new and old:
                    row += [pct(cp_median / new[0], cp_median / old[0]), pct(new[1], old[1])]
                else:
                    row += ["n/a", "n/a"]
            row += [f"{bound / GIB:.2f}", "n/a" if new is None else ("yes" if new[1] <= bound else "NO")]
            rows.append(row)
        for side in codes:
            errors = [r for r in results.get((label, side), []) if isinstance(r, str)]
            if errors:
                failures.append(f"- {label} [{side}] failed {len(errors)}/{args.repeat}: {errors[0][:400]}")

    shards = len(list(src.glob("*.safetensors"))) if src.exists() else "(removed)"
    print(f"bench_streaming.py, {started_at:%Y-%m-%d %H:%M:%S %Z}; nproc {os.cpu_count()}; "
          f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")
    print("1-minute load at the start/end of each round: " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in round_loads))
    print(f"free disk under {WORK}: {free_before:.1f} GiB before (checkpoint, adapter and copies then built if missing), "
          f"{free_gib(WORK):.1f} GiB after" + (f" (removed what this run built: {', '.join(p.name for p in built) or 'nothing'})"
                                                if args.remove_inputs else ""))
    for side, code in codes.items():
        print(f"{side} code: {code} (git {git_state(code)}); internvl_tools imported from {where[side]}")
    print(f"wide {args.family}-shaped checkpoint ({args.llm_layers} LLM layers): {total / GIB:.2f} GiB in {shards} shards, "
          f"largest tensor {largest / GIB:.2f} GiB, bound 1 GiB + 2 x largest = {bound / GIB:.2f} GiB; "
          f"median of {args.repeat} interleaved rounds; vs cp = median of cp + sync of the command's input / command median "
          f"(higher is better)"
          + ("; change: new relative to old (vs cp: + = faster; RSS: - = less)" if compare else ""))
    print(markdown_table(header, rows))
    if failures:
        print("failures (n/a):")
        print("\n".join(failures))


if __name__ == "__main__":
    main()
