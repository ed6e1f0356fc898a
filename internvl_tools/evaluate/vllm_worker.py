"""Run an InternVL checkpoint in vLLM and report what it computed (a script, not a module).

Run by the interpreter of an environment where vLLM is installed (.venv-vllm, built by
scripts/setup_vllm.sh), never imported by internvl_tools: it imports only vllm, torch, PIL and
safetensors. `python vllm_worker.py JOB.json OUT.json` reads a job and writes the results:

job: {"runs": [{"model": folder, "dtype": "float32" | "bfloat16", "max_model_len": int,
                "top_logprobs": int, "trust_remote_code": bool, "modules": bool,
                "requests": [{"prompt": text with "<image>" where the image goes (or none),
                              "image": PNG/JPEG path or null, "max_new_tokens": int, "stop_ids": [int],
                              "forced_ids": [answer token ids] or null,
                              "pixels": safetensors path (tensor pixel_values) or null}]}]}
out:  {"vllm": version, "import_s": seconds to import vllm, "runs": [{"model", "quantization": vLLM's quant method,
       "dtype": the dtype vLLM runs the model in ("float32", "bfloat16", ...),
       "load_s": seconds to start the engine (LLM(...)), "seconds": the whole run's,
       "modules": {module: quant method class[/scheme]}, "results": [{"prompt_ids", "ids", "text",
       "forced": [{"top": {id: logprob}, "best": id}] | null, "features": safetensors path | null}]}
       or {"model", "error": the exception's last line, "seconds"}]}

`<image>` becomes the placeholder vLLM's processor for that architecture expands (original
layout: `<image>`; native layout: the processor's `<IMG_CONTEXT>`). `forced_ids` scores the
given answer by teacher forcing (prompt logprobs of the prompt + answer, top `top_logprobs` ids
per position); `pixels` runs the model's own vision tower + projector (`extract_feature`) on
those pixel values and saves the features next to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# this folder holds modules named like the standard library's (inspect.py): never import from it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: apply_model without pickling
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (tiny and verify prompts)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def placeholder(config: dict, processor_image_token: str | None) -> str:
    """The image placeholder vLLM's processor for this checkpoint's architecture expands."""
    if "InternVLChatModel" in (config.get("architectures") or []):
        return "<image>"
    return processor_image_token or "<IMG_CONTEXT>"


def linear_methods(model) -> dict[str, str]:
    """{module name: "QuantMethodClass[/SchemeClass]:dtype of its weight"} for every module vLLM
    gave a quant method (linears, the LM head, embeddings) and every plain torch Linear."""
    import torch

    found = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            scheme = getattr(module, "scheme", None)
            label = type(method).__name__ + (f"/{type(scheme).__name__}" if scheme is not None else "")
        elif isinstance(module, torch.nn.Linear):
            label = "torch.nn.Linear"
        else:
            continue
        weight = next((getattr(module, n) for n in ("weight", "qweight", "weight_packed") if isinstance(getattr(module, n, None), torch.Tensor)), None)
        found[name] = label + (f":{str(weight.dtype).removeprefix('torch.')}" if weight is not None else "")
    return found


def run_one(run: dict, out_path: Path, number: int) -> dict:
    """Load one checkpoint in vLLM, answer its requests, report its modules; then free it."""
    import gc
    import time

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from vllm import LLM, SamplingParams

    config = json.loads((Path(run["model"]) / "config.json").read_text())
    top = int(run.get("top_logprobs", 20))
    started = time.perf_counter()
    llm = LLM(model=run["model"], dtype=run.get("dtype", "float32"), max_model_len=int(run.get("max_model_len", 1024)),
              enforce_eager=True, max_num_seqs=1, limit_mm_per_prompt={"image": 1}, max_logprobs=top,
              trust_remote_code=bool(run.get("trust_remote_code", False)), seed=0)
    tokenizer = llm.get_tokenizer()
    image_token = placeholder(config, getattr(tokenizer, "context_image_token", None))
    model_config = llm.llm_engine.vllm_config.model_config
    out: dict = {"model": run["model"], "quantization": model_config.quantization,
                 "dtype": str(model_config.dtype).removeprefix("torch."),
                 "load_s": round(time.perf_counter() - started, 3), "results": []}
    if run.get("modules"):
        out["modules"] = llm.apply_model(linear_methods)[0]
    for index, request in enumerate(run["requests"]):
        text = request["prompt"].replace("<image>", image_token)
        data = {"image": Image.open(request["image"]).convert("RGB")} if request.get("image") else None
        media = {"multi_modal_data": data} if data else {}
        params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]), seed=0,
                                stop_token_ids=request.get("stop_ids") or None, skip_special_tokens=True)
        generated = llm.generate([{"prompt": text, **media}], params, use_tqdm=False)[0]
        result = {"prompt_ids": list(generated.prompt_token_ids), "ids": list(generated.outputs[0].token_ids),
                  "text": generated.outputs[0].text, "forced": None, "features": None}
        forced = request.get("forced_ids")
        if forced is not None:
            ids = tokenizer(text).input_ids + list(forced)
            scored = llm.generate([{"prompt_token_ids": ids, **media}],
                                  SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top), use_tqdm=False)[0]
            steps = scored.prompt_logprobs[len(scored.prompt_logprobs) - len(forced):] if forced else []
            result["forced_prompt_ids"] = list(scored.prompt_token_ids)
            result["forced"] = [{"top": {str(k): v.logprob for k, v in step.items()},
                                 "best": next((k for k, v in step.items() if v.rank == 1), None)} for step in steps]
        if request.get("pixels"):
            pixels = load_file(request["pixels"])["pixel_values"]

            def features(model, pixels=pixels):
                dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
                with torch.no_grad():
                    return model.extract_feature(pixels.to(dtype)).float().cpu()

            path = out_path.with_name(f"{out_path.stem}-features-{number}-{index}.safetensors")
            save_file({"features": llm.apply_model(features)[0].contiguous()}, str(path))
            result["features"] = str(path)
        out["results"].append(result)
    del llm
    gc.collect()
    gc.freeze()  # what survives is module state (see main)
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def main(job_path: str, out_path: str) -> None:
    """Every run of the job in turn, in this one process (vLLM is imported once); a run that fails
    reports its error (the last line of it) and the others go on."""
    import gc
    import time
    import traceback

    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams  # noqa: F401 (imported before the freeze below)

    imported = round(time.perf_counter() - started, 3)
    # vLLM calls gc.collect() about 8 times per engine start and shutdown, each a walk over every object
    # its imports made (0.4-1 s apiece here): frozen, they are skipped (and still freed by reference counting)
    gc.freeze()
    job = json.loads(Path(job_path).read_text())
    runs = []
    for number, run in enumerate(job["runs"]):
        began = time.perf_counter()
        try:
            runs.append(run_one(run, Path(out_path), number))
        except Exception as exc:  # noqa: BLE001 (reported to the caller, which decides)
            lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
            runs.append({"model": run["model"], "error": lines[-1].strip(), "seconds": round(time.perf_counter() - began, 3)})
    Path(out_path).write_text(json.dumps({"vllm": vllm.__version__, "import_s": imported, "runs": runs}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_worker.py JOB.json OUT.json")
    main(sys.argv[1], sys.argv[2])
