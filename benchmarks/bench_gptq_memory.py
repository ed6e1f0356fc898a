"""GPTQ / AWQ peak memory on the wide InternVL2-Llama3-76B-shaped checkpoint (true Llama-3-70B
widths: hidden 8192, intermediate 28672, 64 heads / 8 KV heads; 2 decoder layers).

Peak RSS should be about 1 GiB + a small multiple of one decoder layer + the calibration
activations, never the whole LLM.

Run: python benchmarks/bench_gptq_memory.py [--method gptq|awq] [--samples 8] [--seq-len 256] [--layers N] [--grid N]

With --layers, the peak is also split (sampled every 0.2 s from /proc/self/status) into anonymous memory
(RssAnon: what the run allocates) and file-backed pages (RssFile: the checkpoint tensors mapped from
the page cache, which the kernel reclaims under pressure, so the total depends on what else runs).

--layers 0 (GPTQ's default) runs `internvl-tools quantize` over the whole checkpoint; --layers N
(AWQ's default 1: its scale search is ~470 TFLOP per layer at this width, about an hour on 2
cores) runs the same pipeline through the library and stops once N decoder layers are finished
and written, so the figure is one true-width layer's peak (every layer has the same shapes). The
AWQ run uses the CLI's defaults: w4 g128 with zero points, gemm output, 20-point scale grid,
clipping search. --grid N (AWQ) cuts the scale search and the clipping search to N points each:
the tensors alive at one grid point are the same whatever the number of points (the searches
alone on a 2048 x 7168 linear peak at the same RSS with 2 and 20 points), so the anonymous
peak is the full search's, in minutes instead of an hour; its time is not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, folder_bytes, fresh, markdown_table, timed, wide_checkpoint  # noqa: E402

# the library run that stops after N finished layers (argv: method, source, out, samples, seq_len, layers, AWQ grid)
STOP_AFTER = """
import json, sys, threading, time
from pathlib import Path

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}

peak = {"RssAnon": 0, "RssFile": 0}

def sample():  # RssAnon (the process's own memory) vs RssFile (mapped checkpoint pages, reclaimable), every 0.2 s
    while True:
        now = status()
        for key in peak:
            peak[key] = max(peak[key], now[key])
        time.sleep(0.2)

threading.Thread(target=sample, daemon=True).start()
method, src, out, samples, seq_len, layers, grid = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:8])
started = time.perf_counter()

class Done(Exception):
    pass

def progress(done):
    print(f"layer {done} finished at {time.perf_counter() - started:.0f} s", flush=True)
    if done >= layers:
        raise Done

if method == "awq":
    from internvl_tools.calibrate.awq import AWQConfig
    from internvl_tools.calibrate.awq_quantizer import AWQJob, quantize_awq as run
    grids = {"n_grid": grid, "clip_grid": grid} if grid else {}
    job = AWQJob(AWQConfig(group_size=128, **grids), num_samples=samples, seq_len=seq_len)
else:
    from internvl_tools.calibrate.gptq import GPTQConfig
    from internvl_tools.calibrate.gptq_quantizer import GPTQJob, quantize_gptq as run
    job = GPTQJob(GPTQConfig(), num_samples=samples, seq_len=seq_len)
try:
    run(src, out, job, max_shard_size=5 * 2**30, log=lambda line: print(line, flush=True), progress=progress)
except Done:
    pass
print("PEAKS " + json.dumps({**peak, "VmHWM": status()["VmHWM"]}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="stop after N decoder layers (0: all; AWQ default 1)")
    parser.add_argument("--grid", type=int, default=0, help="AWQ: points of the scale and clipping searches (0: the defaults, 20)")
    args = parser.parse_args()
    layers = args.layers if args.layers is not None else (1 if args.method == "awq" else 0)
    src = wide_checkpoint()
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.models.layout import build_layout

    with CheckpointReader(src) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        layer = sum(reader.spec(k).nbytes for k in layout.llm_layer_keys(0))
        llm = sum(reader.spec(k).nbytes for k, i in layout.keys.items() if i.family == "llm")
    hidden = config["llm_config"]["hidden_size"]
    activations = args.samples * args.seq_len * hidden * 4
    out = fresh(WORK / f"{args.method}-wide")
    if layers:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", STOP_AFTER, args.method, str(src), str(out),
                               str(args.samples), str(args.seq_len), str(layers), str(args.grid)], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit("benchmark command failed")
        rss = int(proc.stderr.strip().splitlines()[-1]) * 1024
        peaks = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PEAKS "))[6:])
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("layer ")))
        split = f"{peaks['RssAnon'] / GIB:.2f} / {peaks['RssFile'] / GIB:.2f}"
        written, what = "-", f"{layers} of 2 layers"
        fresh(out.with_name(out.name + ".partial"))
    else:
        seconds, rss = timed([sys.executable, "-m", "internvl_tools", "quantize", str(src), "-o", str(out), "--method", args.method,
                              "--num-samples", str(args.samples), "--seq-len", str(args.seq_len), "--json"])
        written, what, split = f"{folder_bytes(out) / GIB:.2f}", "2 layers", "-"
    fresh(out)
    scheme = "w4 g128" + (" zero point" + (f", {args.grid}-point grids" if args.grid else "") if args.method == "awq" else "")
    print(f"wide InternVL2-Llama3-76B-shaped checkpoint ({folder_bytes(src) / GIB:.2f} GiB, 2 decoder layers of "
          f"{layer / GIB:.2f} GiB bf16); {args.samples} samples x {args.seq_len} tokens")
    print(markdown_table(
        ["run", "seconds", "output GiB", "peak RSS GiB", "peak anonymous / file-backed GiB", "one layer bf16 GiB", "activations GiB",
         "whole LLM of the real 76B GiB"],
        [[f"quantize --method {args.method} ({scheme}, {what})", f"{seconds:.0f}", written, f"{rss / GIB:.2f}", split, f"{layer / GIB:.2f}",
          f"{activations / GIB:.3f}", f"{(llm + 78 * layer) / GIB:.0f}"]]))


if __name__ == "__main__":
    main()
