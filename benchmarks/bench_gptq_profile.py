"""Where GPTQ's time goes per decoder layer: ours vs GPTQModel 7.7, stage by stage.

Stages (seconds per decoder layer, each counted exclusive of the others it calls):
- read layer: building the layer alone from the checkpoint stream, float32 (ours only; GPTQModel
  has the whole model loaded before it starts, load time not counted),
- forward: the calibration samples through the layer (ours: up to each input group's module, then
  once through the quantized layer; GPTQModel: the whole layer per subset, plus its replay),
- Hessian: accumulating H = 2 X^T X / n from the captured inputs,
- Cholesky: column order, dampening, the inverse Cholesky factor of H,
- column sweep: GPTQ's blocks of 128 columns with lazy batch updates (group scales, codes, error),
- pack + write: GPTQ v1 packing, the dequantized weight back into the layer, writing the tensors,
- other: the layer's wall time minus the stages (hooks, bookkeeping; GPTQModel's thread pools can
  make stages overlap, so its "other" can be negative).

Both get the same token sequences: --samples chunks of exactly --seq-len tokens of standard-library
docstrings (ours reads them as `--calib` text rows, whose chat template makes them longer, so they are
cut at --seq-len; GPTQModel gets the token ids). 4-bit, symmetric, GAR (both defaults), group 128 (64 on
SmolLM2, whose 576 input features 128 does not divide).

- `--model smollm2`: SmolLM2-135M-Instruct real weights (bench_gptq_smollm2.py's checkpoint; its 30
  layers; GPTQModel on the same weights as a LlamaForCausalLM),
- `--model wide`: ONE true-width Llama-3-70B decoder layer (hidden 8192, intermediate 28672, 64/8
  heads) from the wide InternVL2-Llama3-76B checkpoint: ours stops after layer 0; GPTQModel gets a
  1-layer LlamaForCausalLM built from the same tensors (embedding, layer 0, norm, head: 5.8 GB bf16,
  built once under bench-work/).
`--layers N` stops ours after N layers (per-layer figures need only a few; every layer has the same shapes).
`--only ours|gptqmodel` runs one side (the other side's last result is read from bench-work/ when
present). Run: python benchmarks/bench_gptq_profile.py --model smollm2 --samples 32 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORK, fresh, markdown_table  # noqa: E402

GPTQ_PYTHON = ROOT / ".venv-gptq" / "bin" / "python"
STAGES = ["read layer", "forward", "Hessian", "Cholesky", "column sweep", "pack + write"]

# exclusive per-thread stage timers, shared by both runners (argv-free; exec'd first)
PROFILER = r'''
import functools, threading, time, collections
TOTALS = collections.defaultdict(float)
_local = threading.local()

def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack

def _enter(key):
    stack, now = _stack(), time.perf_counter()
    if stack:
        TOTALS[stack[-1][0]] += now - stack[-1][1]
    stack.append([key, now])

def _leave():
    stack, now = _stack(), time.perf_counter()
    key, mark = stack.pop()
    TOTALS[key] += now - mark
    if stack:
        stack[-1][1] = now

def timed(key, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _enter(key)
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()
    return wrapper

def timed_generator(key, fn):
    """Times each step of a generator (not the caller's work between steps)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        gen = fn(*args, **kwargs)
        while True:
            _enter(key)
            try:
                item = next(gen)
            except StopIteration:
                return
            finally:
                _leave()
            yield item
    return wrapper
'''

OURS = PROFILER + r'''
import json, sys
from pathlib import Path
import torch
from internvl_tools.calibrate import gptq_quantizer, pipeline
from internvl_tools.calibrate.gptq import GPTQConfig
from internvl_tools.calibrate.gptq_quantizer import GPTQJob, quantize_gptq
from internvl_tools.models import views

src, out, calib, samples, seq_len, layers, group = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:8])
forward_dtype = sys.argv[8]
pipeline.build_decoder_layer = timed("read layer", pipeline.build_decoder_layer)
pipeline.DecoderLayer.inputs = timed_generator("forward", pipeline.DecoderLayer.inputs)
pipeline.DecoderLayer.outputs = timed_generator("forward", pipeline.DecoderLayer.outputs)
gptq_quantizer.GPTQQuantizer.observe = timed("Hessian", gptq_quantizer.GPTQQuantizer.observe)
gptq_quantizer.prepare_hessian = timed("Cholesky", gptq_quantizer.prepare_hessian)
gptq_quantizer.gptq_quantize = timed("column sweep", gptq_quantizer.gptq_quantize)
gptq_quantizer.GPTQQuantizer._pack = timed("pack + write", gptq_quantizer.GPTQQuantizer._pack)
gptq_quantizer.GPTQResult.dequantize = timed("pack + write", gptq_quantizer.GPTQResult.dequantize)
views.LayoutWriter.write = timed("pack + write", views.LayoutWriter.write)
pipeline.DecoderLayer.set_weight = timed("pack + write", pipeline.DecoderLayer.set_weight)

class Done(Exception):
    pass

marks = {}
def progress(done):
    marks[done] = (time.perf_counter(), dict(TOTALS))
    print(f"layer {done} finished: {marks[done][0] - marks[0][0]:.1f} s, " + ", ".join(f"{k} {v - marks[0][1].get(k, 0):.1f}"
          for k, v in sorted(TOTALS.items())), file=sys.stderr, flush=True)
    if layers and done >= layers:
        raise Done

def log(line):
    if line.startswith("calibration") and "samples" in line:
        marks[0] = (time.perf_counter(), dict(TOTALS))

job = GPTQJob(GPTQConfig(group_size=group), num_samples=samples, seq_len=seq_len, calib=calib, forward_dtype=forward_dtype)
try:
    quantize_gptq(src, out, job, max_shard_size=5 * 2**30, log=log, progress=progress)
except Done:
    pass
(t0, s0), last = marks[0], max(marks)
(t1, s1) = marks[last]
print("PROFILE " + json.dumps({"layers": last, "wall": t1 - t0, "threads": torch.get_num_threads(), "forward_dtype": forward_dtype,
                               "stages": {k: v - s0.get(k, 0.0) for k, v in s1.items()}}))
'''

THEIRS = PROFILER + r'''
import json, sys
import torch
from gptqmodel import GPTQModel, QuantizeConfig
from gptqmodel.quantization import gptq as G
from gptqmodel.looper import gptq_processor
from transformers.models.llama import modeling_llama

src, out, ids_file, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
G.GPTQ.add_batch = timed("Hessian", G.GPTQ.add_batch)
G.GPTQ.hessian_inverse = timed("Cholesky", G.GPTQ.hessian_inverse)
G.GPTQ.quantize = timed("column sweep", G.GPTQ.quantize)
gptq_processor.pack_module = timed("pack + write", gptq_processor.pack_module)
modeling_llama.LlamaDecoderLayer.forward = timed("forward", modeling_llama.LlamaDecoderLayer.forward)
ids = json.loads(open(ids_file).read())
calibration = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in ids]
config = QuantizeConfig(bits=4, group_size=group, sym=True, desc_act=False, damp_percent=0.01)
model = GPTQModel.load(src, config, device="cpu")
layers = model.model.config.num_hidden_layers
started = time.perf_counter()
before = dict(TOTALS)
model.quantize(calibration, batch_size=1)
wall = time.perf_counter() - started
print("PROFILE " + json.dumps({"layers": layers, "wall": wall, "threads": torch.get_num_threads(),
                               "stages": {k: v - before.get(k, 0.0) for k, v in TOTALS.items()}}))
'''


def token_chunks(tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """`samples` chunks of exactly `seq_len` token ids of standard-library docstrings."""
    from bench_gptq_smollm2 import heldout_ids

    chunks = heldout_ids(tokenizer, samples, seq_len)
    if len(chunks) < samples:
        raise SystemExit(f"only {len(chunks)} chunks of {seq_len} tokens in the docstring text")
    return [c[0].tolist() for c in chunks]


def smollm2_sources() -> tuple[Path, Path]:
    """(our InternVL checkpoint, GPTQModel's LlamaForCausalLM folder) with SmolLM2's real weights."""
    import torch

    from bench_gptq_smollm2 import build_checkpoint, smollm2

    ours = build_checkpoint(WORK / "smolvl")
    hf = WORK / "smollm2-hf"
    if not (hf / "config.json").exists():  # as bench_gptq_smollm2.py builds it
        from transformers import LlamaConfig, LlamaForCausalLM

        model, tokenizer = smollm2()
        plain = model.config.to_dict()
        plain.pop("quantization_config", None)
        copy = LlamaForCausalLM(LlamaConfig(**plain))
        copy.load_state_dict(model.state_dict())
        copy.to(torch.bfloat16).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    return ours, hf


def wide_sources() -> tuple[Path, Path]:
    """(the wide InternVL2-Llama3-76B checkpoint, a 1-layer LlamaForCausalLM of its LLM's tensors)."""
    from common import wide_checkpoint

    ours = wide_checkpoint()
    hf = WORK / "llama3-70b-1layer-hf"
    if (hf / "config.json").exists():
        return ours, hf
    from safetensors.torch import save_file

    from internvl_tools.io.reader import CheckpointReader

    partial = fresh(hf.with_name(hf.name + ".building"))
    partial.mkdir(parents=True)
    with CheckpointReader(ours) as reader:
        config = reader.config()
        llm = dict(config["llm_config"], num_hidden_layers=1, architectures=["LlamaForCausalLM"], model_type="llama",
                   torch_dtype="bfloat16", tie_word_embeddings=False)
        keys = [k for k in reader.keys() if k.startswith("language_model.") and ".layers." not in k
                or k.startswith("language_model.model.layers.0.")]
        tensors = {k.removeprefix("language_model."): reader.get(k).contiguous() for k in keys}
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    (partial / "config.json").write_text(json.dumps(llm, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ours / name).exists():
            (partial / name).write_bytes((ours / name).read_bytes())
    partial.rename(hf)
    return ours, hf


def run_side(name: str, code: str, python: Path, argv: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([str(python), "-c", code, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})  # stderr (progress) passes through
    line = next((line for line in proc.stdout.splitlines() if line.startswith("PROFILE ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:])
        raise SystemExit(f"{name}: the profiled run failed")
    return json.loads(line[len("PROFILE "):])


def row(label: str, result: dict) -> list[str]:
    per = {k: v / result["layers"] for k, v in result["stages"].items()}
    wall = result["wall"] / result["layers"]
    cells = [f"{per[s]:.2f}" if s in per else "-" for s in STAGES]
    return [label, *cells, f"{wall - sum(per.values()):.2f}", f"{wall:.2f}", str(result["layers"]), str(result["threads"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "wide"], default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=None, help="default: 64 for smollm2 (576 inputs), 128 for wide")
    parser.add_argument("--layers", type=int, default=None, help="ours: stop after N decoder layers (default: 1 on wide, all on smollm2)")
    parser.add_argument("--only", choices=["ours", "gptqmodel"], default=None)
    parser.add_argument("--forward-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="ours: the calibration forwards' dtype (quantize --forward-dtype); GPTQModel runs the checkpoint's bf16")
    args = parser.parse_args()
    group = args.group_size or (64 if args.model == "smollm2" else 128)
    ours_src, hf = smollm2_sources() if args.model == "smollm2" else wide_sources()
    from transformers import AutoTokenizer

    ids = token_chunks(AutoTokenizer.from_pretrained(hf), args.samples, args.seq_len)
    tag = f"{args.model}-{args.samples}x{args.seq_len}-g{group}"
    calib = WORK / f"profile-calib-{tag}"
    calib.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    (calib / "texts.jsonl").write_text("\n".join(json.dumps({"text": tokenizer.decode(row)}) for row in ids))
    (WORK / f"profile-ids-{tag}.json").write_text(json.dumps(ids))
    results = {}
    for side in ("ours", "gptqmodel"):
        cache = WORK / (f"profile-{side}-{tag}-{args.forward_dtype}.json" if side == "ours" else f"profile-{side}-{tag}.json")
        if args.only not in (None, side):
            if cache.exists():
                results[side] = json.loads(cache.read_text())
            continue
        if side == "ours":
            out = fresh(WORK / f"profile-ours-{args.model}")
            layers = args.layers if args.layers is not None else (1 if args.model == "wide" else 0)
            results[side] = run_side(side, OURS, Path(sys.executable),
                                     [str(ours_src), str(out), str(calib), str(args.samples), str(args.seq_len), str(layers), str(group),
                                      args.forward_dtype])
            fresh(out)
        elif GPTQ_PYTHON.exists():
            out = fresh(WORK / f"profile-gptqmodel-{args.model}")
            results[side] = run_side(side, THEIRS, GPTQ_PYTHON, [str(hf), str(out), str(WORK / f"profile-ids-{tag}.json"), str(group)],
                                     {"GPTQMODEL_CPU_WORKERS": str(os.cpu_count())})
            fresh(out)
        else:
            continue
        cache.write_text(json.dumps(results[side]))
    load = os.getloadavg()
    what = "SmolLM2-135M-Instruct (real weights, 30 layers)" if args.model == "smollm2" else "one true-width Llama-3-70B layer"
    print(f"{what}; {args.samples} samples x {args.seq_len} tokens; w4 g{group} sym GAR; load average now {load[0]:.2f}")
    labels = {"ours": f"internvl-tools (--forward-dtype {args.forward_dtype})", "gptqmodel": "GPTQModel 7.7 (bf16)"}
    print(markdown_table(["run", *STAGES, "other", "seconds per layer", "layers", "torch threads"],
                         [row(labels[side], result) for side, result in results.items()]))


if __name__ == "__main__":
    main()
