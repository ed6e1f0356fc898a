"""GPTQ peak memory and time on ONE wide sparse layer of InternVL3.5-30B-A3B (Qwen3-30B-A3B's true widths:
128 experts of 768 x 2048, top-8; 1 decoder layer, 2 vision layers).

What the peak holds: the decoder layer in float32 (its 128 experts fused as transformers keeps them), one chunk
of expert Hessians (at most a quarter of the activation budget; calibrate/experts.py), the calibration
activations, and what calibration needs before the first layer (the vision runtime and the embedding table in
float32). Run: python benchmarks/bench_gptq_moe.py [--samples 8] [--seq-len 256] [--budget-gib 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import subprocess  # noqa: E402
import time  # noqa: E402

from common import GIB, ROOT, WORK, folder_bytes, fresh, markdown_table, run  # noqa: E402

FAMILY = "InternVL3.5-30B-A3B"


def wide_moe_checkpoint() -> Path:
    """Build (once) the family at true widths with a single decoder layer."""
    out = WORK / f"{FAMILY}-wide-1layer"
    if not (out / "config.json").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        code = ("from pathlib import Path; from internvl_tools.tiny.generator import make_checkpoint; "
                f"make_checkpoint({FAMILY!r}, Path({str(out)!r}), wide=True, llm_layers=1, shards=3, overwrite=True)")
        run([sys.executable, "-c", code])
    return out


def timed_json(cmd: list[str]) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (bytes, GNU time) and the --json summary of one command."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    src = wide_moe_checkpoint()
    from internvl_tools.calibrate.experts import HESSIAN_SHARE, expert_chunks
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.models.layout import build_layout

    with CheckpointReader(src) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        layer = sum(reader.spec(k).nbytes for k in layout.llm_layer_keys(0))
        experts = sum(reader.spec(k).nbytes for k in layout.llm_layer_keys(0) if layout.keys[k].expert is not None)
        table = next(reader.spec(k).numel for k, i in layout.keys.items() if i.part == "embeddings" and i.family == "llm")
    llm = config["llm_config"]
    budget = 2 * GIB  # the pipeline's default activation budget
    chunks = expert_chunks(llm["num_experts"], llm["hidden_size"], budget)
    hessians = len(chunks[0]) * 4 * llm["hidden_size"] ** 2
    out = fresh(WORK / "gptq-moe-wide")
    seconds, rss, summary = timed_json([sys.executable, "-m", "internvl_tools", "quantize", str(src), "-o", str(out), "--method", "gptq",
                          "--num-samples", str(args.samples), "--seq-len", str(args.seq_len), "--json"])
    written = folder_bytes(out)
    fresh(out)
    print(f"{FAMILY} at true widths, 1 sparse decoder layer ({layer / GIB:.2f} GiB bf16, of which {experts / GIB:.2f} GiB in "
          f"{llm['num_experts']} experts), {args.samples} samples x {args.seq_len} tokens; experts in {len(chunks)} chunks "
          f"of {len(chunks[0])} for the gate/up Hessians (budget / {HESSIAN_SHARE})")
    print(markdown_table(
        ["run", "seconds", "output GiB", "peak RSS GiB", "layer fp32 GiB", "expert Hessians alive GiB", "embedding table fp32 GiB",
         "activations GiB"],
        [["quantize --method gptq (w4 g128)", f"{seconds:.0f}", f"{written / GIB:.2f}", f"{rss / GIB:.2f}", f"{2 * layer / GIB:.2f}",
          f"{hessians / GIB:.2f}", f"{4 * table / GIB:.2f}", f"{args.samples * args.seq_len * llm['hidden_size'] * 4 / GIB:.3f}"]]))
    facts = summary.get("experts") or {}
    print(f"experts: {facts.get('gptq')} with GPTQ on their routed tokens, {facts.get('round_to_nearest')} with round-to-nearest "
          f"(fewer than {facts.get('min_tokens_share', 0):.1%} of the calibration tokens); fewest routed: {facts.get('fewest_tokens')}")


if __name__ == "__main__":
    main()
