"""vLLM half of the GPU acceptance run's vLLM step (run by a python that has vLLM).

`python gpu_acceptance_vllm.py JOB.json RESULTS.json [DTYPE]`: for each model of the job (written
by gpu_acceptance_steps.step_vllm_prepare: a quantized checkpoint and prompts with our runtime's
greedy tokens), load it in vLLM (one process, models one after another, each with a small share
of the GPU's memory), generate greedily with the same stop token, and write the token ids with
the top-2 log-probabilities of every step. RESULTS.json is rewritten after every model, so a run
cut short keeps what it finished. The image placeholder is the one vLLM's processor for the
checkpoint's architecture expands (internvl_tools/evaluate/vllm_worker.py's `placeholder`).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker_module():
    """internvl_tools/evaluate/vllm_worker.py, loaded by path (it imports nothing of internvl_tools;
    loading it sets its vLLM environment defaults)."""
    spec = importlib.util.spec_from_file_location("vllm_worker", ROOT / "internvl_tools" / "evaluate" / "vllm_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(job_path: str, out_path: str, dtype: str = "float16") -> None:
    worker = worker_module()
    import torch
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    results: dict = {"vllm": vllm.__version__, "dtype": dtype, "models": []}
    for model in job["models"]:
        entry: dict = {"name": model["name"], "requests": []}
        started = time.perf_counter()
        llm = None
        try:
            llm = LLM(model=model["model"], dtype=dtype, max_model_len=2048, enforce_eager=True, max_num_seqs=1,
                      limit_mm_per_prompt={"image": 1}, max_logprobs=5, seed=0,
                      **({"gpu_memory_utilization": 0.12} if torch.cuda.is_available() else {}))
            entry["load_seconds"] = round(time.perf_counter() - started, 2)
            entry["quantization"] = llm.llm_engine.vllm_config.model_config.quantization
            config = json.loads((Path(model["model"]) / "config.json").read_text())
            token = worker.placeholder(config, getattr(llm.get_tokenizer(), "context_image_token", None))
            for request in model["requests"]:
                data = {"image": Image.open(job["image"]).convert("RGB")} if request.get("image") else None
                prompt = {"prompt": request["prompt"].replace("<image>", token), **({"multi_modal_data": data} if data else {})}
                params = SamplingParams(temperature=0.0, max_tokens=int(model.get("max_new_tokens", job.get("max_new_tokens", 8))), seed=0, logprobs=2,
                                        stop_token_ids=request.get("stop_ids") or None)
                output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
                entry["requests"].append({"ids": [int(i) for i in output.token_ids], "text": output.text,
                                          "logprobs": [{str(k): float(v.logprob) for k, v in step.items()}
                                                       for step in (output.logprobs or [])]})
        except Exception as exc:  # noqa: BLE001 - one model's failure is its row
            traceback.print_exc()
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if "error," in line.lower()), lines[0] if lines else "")
            entry["error"] = f"{type(exc).__name__}: {detail}"[:400]
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results["models"].append(entry)
        Path(out_path).write_text(json.dumps(results, indent=1))
        print(f"vllm: {model['name']}: {entry.get('error') or 'done'} in {entry['seconds']} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: gpu_acceptance_vllm.py JOB.json RESULTS.json [DTYPE]")
    main(*sys.argv[1:])
