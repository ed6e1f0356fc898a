"""vLLM (CPU build, in .venv-vllm) serves this toolkit's outputs as our runtime computes them.

One make-tiny checkpoint per LLM dialect, with head_dim 32 (vLLM's CPU attention takes 32, 64,
80, ...; make-tiny's default is 16), as written by make-tiny (original layout, made readable by
vLLM with tiny/configuration_internvl_chat.py) and by convert (native), quantize --method gptq
and quantize --method int8 --format w8a8 (both native; W8A8 also original for one dialect). vLLM
runs them all in one process (evaluate/vllm_worker.py) with an image prompt; each must give our
runtime's prompt ids and greedy tokens, its log-probabilities along those tokens and its image
features, and keep the vision tower and projector unquantized; AWQ and compressed-tensors W4A16
too (qwen2), and the combinations vLLM's CPU build refuses are refused for the reasons the README
gives. Skipped without .venv-vllm (scripts/setup_vllm.sh builds it; .ci/run does).
"""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.evaluate import vllm_engine

from .support import sample_image

PYTHON = vllm_engine.vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason=f"no vLLM environment: {vllm_engine.HOW_TO_BUILD}")

DIALECTS = {"qwen2": "InternVL2-1B", "internlm2": "InternVL2-2B", "phi3": "InternVL2-4B", "llama": "InternVL2-Llama3-76B",
            "qwen3": "InternVL3.5-1B", "internlm3": "InternVL3-9B-InternLM3"}
OUTPUTS = ("original", "native", "gptq", "w8a8")
# original-layout ignore rules; ps_version v1 (image transposed for the native layout); the other 4-bit formats
EXTRA = [("llama", "w8a8-original"), ("llama-v1", "original"), ("llama-v1", "native"), ("qwen2", "awq"), ("qwen2", "w4a16")]
CASES = [(d, o) for d in DIALECTS for o in OUTPUTS] + EXTRA
CALIB = ["--group-size", "32", "--num-samples", "2", "--seq-len", "16"]
QUANTIZE = {  # output -> quantize options (all from the native checkpoint but w8a8-original)
    "gptq": ["--method", "gptq", *CALIB], "w8a8": ["--method", "int8", "--format", "w8a8"],
    "w8a8-original": ["--method", "int8", "--format", "w8a8"], "awq": ["--method", "awq", *CALIB],
    "w4a16": ["--method", "gptq", "--format", "compressed-tensors", *CALIB],
    "bnb": ["--method", "int8"], "w8a16": ["--method", "int8", "--format", "compressed-tensors"],
    "gptq-8bit": ["--method", "gptq", "--bits", "8", *CALIB], "gptq-asym": ["--method", "gptq", "--asym", *CALIB],
    "gptq-desc-act": ["--method", "gptq", "--desc-act", *CALIB],
}
# what vLLM's CPU build refuses, and the words of its reason (README, "vLLM": unsupported combinations)
REFUSED = {"bnb": "Unknown quantization method: bitsandbytes", "w8a16": "(uint8b128) not supported by CPUWNA16",
           "gptq-8bit": "uint8b128", "gptq-asym": "bits=4, sym=False", "gptq-desc-act": "desc_act=True) is no longer supported"}
QUESTION = "What is in the image?"
NEW_TOKENS = 6
# max |log p(vLLM) - log p(ours)| along the answer: float32 kernels; packed int4 in bf16 (vLLM refuses fp32) and W8A8's int8 activations
LOGPROB_TOLERANCE = {"original": 2e-3, "native": 2e-3, "gptq": 0.05, "w8a8": 0.05, "w8a8-original": 0.05, "awq": 0.05, "w4a16": 0.05}


def _checkpoint(root, dialect: str, output: str, invoke):
    """The folder of one case, written by make-tiny / convert / quantize."""
    from internvl_tools.tiny.generator import add_config_module, make_checkpoint

    family = "InternVL-Chat-V1-2" if dialect == "llama-v1" else DIALECTS[dialect]
    base = root / dialect
    original, native = base / "original", base / "native"
    if not original.exists():
        make_checkpoint(family, original, head_dim=32, shards=1)
        add_config_module(original)
    if output == "original":
        return original
    if not native.exists():
        invoke("convert", original, "-o", native)
    if output == "native":
        return native
    folder = base / output
    invoke("quantize", original if output == "w8a8-original" else native, "-o", folder, *QUANTIZE[output])
    if output == "w8a8-original":
        add_config_module(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{(dialect, output): (folder, what our runtime computed, what vLLM computed)}, vLLM run once for all."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli
    from internvl_tools.runtime.model import InternVLRuntime

    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    root = tmp_path_factory.mktemp("vllm")
    image = sample_image(3)
    ours, runs = {}, []
    for number, (dialect, output) in enumerate(CASES):
        folder = _checkpoint(root, dialect, output, invoke)
        runtime = InternVLRuntime(folder)
        pixels = runtime.pixel_values(image)
        text, ids = runtime.generate(QUESTION, image, max_new_tokens=NEW_TOKENS)
        prompt = runtime.prompt_ids(QUESTION, pixels.shape[0])
        logits = runtime.logits(torch.cat([prompt, torch.tensor([ids])], dim=1), pixels)[0]
        along = torch.log_softmax(logits[prompt.shape[1] - 1 : prompt.shape[1] - 1 + len(ids)].float(), dim=-1)
        ours[(dialect, output)] = {"prompt_ids": prompt[0].tolist(), "ids": ids, "logprobs": along,
                                   "features": runtime.image_features(pixels).float()}
        entry = vllm_engine.request(root, f"request-{number}", folder, runtime.config, runtime.tokenizer, QUESTION, image,
                                    NEW_TOKENS, forced_ids=ids, pixels=pixels)
        runs.append(vllm_engine.run_spec(folder, [entry], top_logprobs=16, max_model_len=1024, modules=True))
    for dialect, output in [("qwen2", name) for name in REFUSED]:
        folder = _checkpoint(root, dialect, output, invoke)
        runs.append(vllm_engine.run_spec(folder, [], max_model_len=1024))
    output = vllm_engine.run_vllm(runs, workdir=root, timeout=3000, python=PYTHON)
    cases = CASES + [("qwen2", name) for name in REFUSED]
    return {case: (run["model"], ours.get(case), run) for case, run in zip(cases, output["runs"])}


@needs_vllm
@pytest.mark.parametrize("dialect,output", CASES, ids=[f"{d}-{o}" for d, o in CASES])
def test_vllm_gives_our_tokens(served, dialect, output):
    folder, ours, run = served[(dialect, output)]
    assert "error" not in run, f"{folder}: {run.get('error')}"
    result = run["results"][0]
    assert result["prompt_ids"] == ours["prompt_ids"]  # same template, tiling and image-token count
    assert result["forced_prompt_ids"] == ours["prompt_ids"] + ours["ids"]
    assert result["ids"] == ours["ids"]  # greedy tokens
    worst = max(abs(lp - ours["logprobs"][position, token].item())
                for position, step in enumerate(vllm_engine.forced_logprobs(result)) for token, lp in step.items())
    assert worst < LOGPROB_TOLERANCE[output], worst
    cosine = torch.nn.functional.cosine_similarity(result["features"].flatten(), ours["features"].flatten(), dim=0)
    assert cosine > (0.9999 if output != "gptq" else 0.999), cosine  # vLLM's own vision tower + projector


@needs_vllm
@pytest.mark.parametrize("dialect,output", [c for c in CASES if c[1] != "original" and c[1] != "native"],
                         ids=[f"{d}-{o}" for d, o in CASES if o not in ("original", "native")])
def test_vllm_keeps_vision_and_projector_unquantized(served, dialect, output):
    folder, _, run = served[(dialect, output)]
    assert "error" not in run, run.get("error")
    expected = {"gptq": "gptq", "awq": "awq", "w4a16": "compressed-tensors", "w8a8": "compressed-tensors",
                "w8a8-original": "compressed-tensors"}[output]
    assert expected in run["quantization"]  # vLLM names GPTQ "auto_gptq" on CPU
    modules = run["modules"]
    towers = {k: v for k, v in modules.items() if k.startswith(("vision_model.", "mlp1.", "vision_tower.", "multi_modal_projector."))}
    assert towers and all(v.startswith(("UnquantizedLinearMethod", "torch.nn.Linear")) and v.endswith(("float32", "bfloat16"))
                          for v in towers.values()), towers
    decoder = {k: v for k, v in modules.items() if ".layers." in k and k.startswith("language_model.") and k.endswith("_proj")}
    kernel = {"gptq": "GPTQ", "awq": "AWQ", "w4a16": "WNA16"}.get(output, "W8A8Int8")
    assert decoder and all(kernel in v for v in decoder.values()), decoder
    assert modules["language_model.lm_head"].startswith("Unquantized")


@needs_vllm
@needs_vllm
@pytest.mark.parametrize("output", list(REFUSED))
def test_vllm_cpu_refuses_what_the_readme_lists(served, output):
    """bitsandbytes, 8-bit weight-only (W8A16, GPTQ 8-bit), asymmetric and act-order GPTQ: vLLM's
    CPU build refuses them at load time with these reasons (the README quotes them)."""
    _, _, run = served[("qwen2", output)]
    assert REFUSED[output] in run.get("error", ""), run


@needs_vllm
def test_worker_reports_a_failing_checkpoint(tmp_path):
    """A run that vLLM cannot load reports its error; the job goes on."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"}))
    output = vllm_engine.run_vllm([{"model": str(broken), "requests": []}], workdir=tmp_path, python=PYTHON, timeout=600)
    assert output["vllm"] and output["runs"][0]["error"]


# -- verify --engine vllm ---------------------------------------------------------------------
def _slice(tmp_path):
    from internvl_tools.io.slices import write_tsv

    from .support import make_items

    return write_tsv(make_items(4), tmp_path / "slice.tsv")


@needs_vllm
def test_verify_engine_vllm(served, tmp_path, run_cli):
    """The reference in our runtime, the candidate in vLLM: the same model drifts by float noise
    only; its W8A8 copy by what int8 costs; the report is verify's own."""
    reference, w8a8 = served[("qwen2", "native")][0], served[("qwen2", "w8a8")][0]
    bench = _slice(tmp_path)
    same = run_cli("verify", reference, reference, "--bench", bench, "--engine", "vllm", "--max-new-tokens", "4", "--json", "-")
    assert same.exit_code == 0, same.output
    report = json.loads(same.output)
    assert report["passed"] and report["engine"] == "vllm" and report["items"] == 4
    overall = report["overall"]
    assert overall["mean_kl"] < 1e-4 and overall["top1_agreement"] == 100.0 and overall["answer_agreement"] == 100.0
    assert overall["image_cosine"] > 0.9999
    quantized = run_cli("verify", reference, w8a8, "--bench", bench, "--engine", "vllm", "--max-new-tokens", "4",
                        "--markdown", tmp_path / "r.md", "--json", "-")
    assert quantized.exit_code in (0, 1), quantized.output
    drift = json.loads(quantized.output)["overall"]
    assert 0 < drift["mean_kl"] < 0.05 and drift["image_cosine"] > 0.9999  # int8 LLM, vision untouched
    assert "(in vLLM)" in (tmp_path / "r.md").read_text()


def test_verify_engine_vllm_without_its_environment(tiny, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv(vllm_engine.PYTHON_VARIABLE, str(tmp_path / "no-such-venv" / "bin" / "python"))
    result = run_cli("verify", tiny("InternVL2-1B"), tiny("InternVL2-1B"), "--bench", _slice(tmp_path), "--engine", "vllm")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no vLLM environment" in result.output and "scripts/setup_vllm.sh" in result.output
    onnx = run_cli("verify", tiny("InternVL2-1B"), "--bench", _slice(tmp_path), "--engine", "vllm", "--vision-onnx", tmp_path)
    assert onnx.exit_code == 2 and "--vision-onnx" in onnx.output


def test_partial_kl_equals_verify_kl_when_vllm_returns_every_token():
    from internvl_tools.evaluate.verify import topk_kl

    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    cand = torch.log_softmax(ref + 0.1 * torch.randn(3, 50, generator=g), -1)
    top = ref.topk(8, dim=-1)
    returned = [{int(i): float(cand[p, i]) for i in range(50)} for p in range(3)]
    expected = topk_kl(top.values, cand.gather(-1, top.indices))
    torch.testing.assert_close(vllm_engine.topk_kl_partial(top.values, top.indices, returned), expected)
    missing = [{k: v for k, v in step.items() if k != int(top.indices[p, 3])} for p, step in enumerate(returned)]
    coarse = vllm_engine.topk_kl_partial(top.values, top.indices, missing)
    assert (coarse >= 0).all() and (coarse <= expected + 1e-6).all()  # a coarser partition: never more KL
