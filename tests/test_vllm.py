"""vLLM (CPU build, in .venv-vllm) serves this toolkit's outputs as our runtime computes them.

One make-tiny checkpoint per LLM dialect, with head_dim 32 (vLLM's CPU attention takes 32, 64,
80, ...; make-tiny's default is 16), as written by make-tiny (original layout, made readable by
vLLM with tiny/configuration_internvl_chat.py), convert (native), quantize (GPTQ, AWQ, W4A16,
W8A8), merge-lora and shard. vLLM runs them all in one process (evaluate/vllm_worker.py: vllm is
imported once, one engine per checkpoint) with an image prompt; each must give our runtime's
prompt ids and greedy tokens, its log-probabilities along those tokens and its image features,
and keep the vision tower and projector unquantized; the combinations vLLM's CPU build refuses
are refused for the reasons the README gives.

Two tiers (README, "vLLM"): by default a representative subset (every dialect in bf16, both
layouts; every other output on qwen2, the cheapest), about 90 s; the whole matrix (every output
on every dialect, ps_version v1, the refusals) is marked `vllm_full` and runs with
INTERNVL_TOOLS_VLLM_FULL=1 or `-m vllm_full` (conftest.py deselects it otherwise). The fixture
serves only the cases of the tests selected. Skipped without .venv-vllm (scripts/setup_vllm.sh
builds it; .ci/run does).
"""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.evaluate import vllm_engine

from .support import sample_image

PYTHON = vllm_engine.vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason=f"no vLLM environment: {vllm_engine.HOW_TO_BUILD}")
FULL = pytest.mark.vllm_full

DIALECTS = {"qwen2": "InternVL2-1B", "internlm2": "InternVL2-2B", "phi3": "InternVL2-4B", "llama": "InternVL2-Llama3-76B",
            "qwen3": "InternVL3.5-1B", "internlm3": "InternVL3-9B-InternLM3"}
CHEAPEST = "qwen2"
OUTPUTS = ("original", "native", "gptq", "w8a8", "merged", "resharded")
# original-layout ignore rules; ps_version v1 (image transposed for the native layout); the other 4-bit formats
EXTRA = [("llama", "w8a8-original"), ("llama-v1", "original"), ("llama-v1", "native"), (CHEAPEST, "awq"), (CHEAPEST, "w4a16")]
CASES = [(d, o) for d in DIALECTS for o in OUTPUTS] + EXTRA
# the default tier: bf16 in both layouts for every dialect, every other output on the cheapest one
QUICK = {(d, o) for d in DIALECTS for o in ("original", "native")} | {(CHEAPEST, o) for o in OUTPUTS + ("awq", "w4a16")}
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
LOGPROB_TOLERANCE = {"original": 2e-3, "native": 2e-3, "merged": 2e-3, "resharded": 2e-3, "gptq": 0.05, "w8a8": 0.05,
                     "w8a8-original": 0.05, "awq": 0.05, "w4a16": 0.05}
BROKEN = ("broken", "config")  # a checkpoint vLLM cannot load, in the same job


def _tiered(cases, quick=QUICK):
    """pytest.param per case, the ones outside the default tier marked vllm_full."""
    return [pytest.param(*case, id="-".join(case), marks=() if case in quick else FULL) for case in cases]


def _checkpoint(root, dialect: str, output: str, invoke):
    """The folder of one case, written by make-tiny / convert / quantize / merge-lora / shard."""
    from internvl_tools.tiny.generator import add_config_module, make_checkpoint

    family = "InternVL-Chat-V1-2" if dialect == "llama-v1" else DIALECTS[dialect]
    base = root / dialect
    original, native = base / "original", base / "native"
    if output == "merged":  # an embedded-LoRA checkpoint (LLM and vision) merged by merge-lora
        adapted = base / "lora"
        make_checkpoint(family, adapted, head_dim=32, shards=1, lora="embedded")
        add_config_module(adapted)
        invoke("merge-lora", adapted, "-o", base / "merged")
        return base / "merged"
    if not original.exists():
        make_checkpoint(family, original, head_dim=32, shards=1)
        add_config_module(original)
    if output == "original":
        return original
    if output == "resharded":  # the original layout in 4 shards of at most 300 KB
        invoke("shard", original, "-o", base / "resharded", "--max-shard-size", "300KB")
        return base / "resharded"
    if not native.exists():
        invoke("convert", original, "-o", native)
    if output == "native":
        return native
    folder = base / output
    invoke("quantize", original if output == "w8a8-original" else native, "-o", folder, *QUANTIZE[output])
    if output == "w8a8-original":
        add_config_module(folder)
    return folder


def _cases_selected(session, module) -> tuple[list, list, bool]:
    """(served cases, refused outputs, broken checkpoint wanted) for the tests of this module that
    this session runs: the fixture builds and serves only those."""
    served, refused, broken = [], [], False
    for item in session.items:
        if getattr(item, "module", None) is not module:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = item.originalname if hasattr(item, "originalname") else item.name
        if "dialect" in params:
            served.append((params["dialect"], params["output"]))
        elif "refused" in params:
            refused.append(params["refused"])
        elif name == "test_worker_reports_a_failing_checkpoint":
            broken = True
        elif name in VERIFY_CASES:
            served += VERIFY_CASES[name]
    return list(dict.fromkeys(served)), list(dict.fromkeys(refused)), broken


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """{(dialect, output): (folder, what our runtime computed, what vLLM computed)} for the cases
    of the selected tests, vLLM run once (one process) for all; also {"vllm_job": timings}."""
    import time

    from click.testing import CliRunner

    from internvl_tools.cli.main import cli
    from internvl_tools.runtime.model import InternVLRuntime

    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    cases, refused, broken = _cases_selected(request.session, request.module)
    root = tmp_path_factory.mktemp("vllm")
    image = sample_image(3)
    ours, runs, started, steps = {}, [], time.perf_counter(), []
    for number, (dialect, output) in enumerate(cases):
        began = time.perf_counter()
        folder = _checkpoint(root, dialect, output, invoke)
        steps.append([dialect, output, round(time.perf_counter() - began, 2)])
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
        steps[-1].append(round(time.perf_counter() - began - steps[-1][-1], 2))
    for output in refused:
        runs.append(vllm_engine.run_spec(_checkpoint(root, CHEAPEST, output, invoke), [], max_model_len=1024))
    keys = cases + [(CHEAPEST, output) for output in refused]
    if broken:
        folder = root / "broken"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"}))
        runs.append({"model": str(folder), "requests": []})
        keys.append(BROKEN)
    prepared = time.perf_counter()
    output = vllm_engine.run_vllm(runs, workdir=root, timeout=3000, python=PYTHON) if runs else {"runs": []}
    served = {case: (run["model"], ours.get(case), run) for case, run in zip(keys, output["runs"])}
    served["vllm_job"] = {"prepare_s": prepared - started, "steps (write s, runtime s)": steps, "vllm_s": time.perf_counter() - prepared,
                          "import_s": output.get("import_s"), "runs": [(k, r.get("load_s"), r.get("seconds")) for k, r in zip(keys, output["runs"])]}
    print("vLLM job (seconds, shown with -s):", json.dumps(served["vllm_job"]))
    return served


def test_default_tier_covers_every_dialect_and_output():
    """The default tier: each dialect in both bf16 layouts, each output at least once."""
    assert {d for d, _ in QUICK} == set(DIALECTS)
    assert {o for _, o in QUICK} >= set(OUTPUTS) | {"awq", "w4a16"}
    assert QUICK <= set(CASES)


@needs_vllm
@pytest.mark.parametrize("dialect,output", _tiered(CASES))
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


QUANTIZED = [case for case in CASES if case[1] in QUANTIZE]


@needs_vllm
@pytest.mark.parametrize("dialect,output", _tiered(QUANTIZED))
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
    # asked for float32 (run_spec's default): packed low-bit weights run in bf16, and vLLM says so
    assert run["dtype"] == ("bfloat16" if output in ("gptq", "awq", "w4a16") else "float32"), run["dtype"]


@needs_vllm
@FULL
@pytest.mark.parametrize("refused", list(REFUSED))
def test_vllm_cpu_refuses_what_the_readme_lists(served, refused):
    """bitsandbytes, 8-bit weight-only (W8A16, GPTQ 8-bit), asymmetric and act-order GPTQ: vLLM's
    CPU build refuses them at load time with these reasons (the README quotes them)."""
    _, _, run = served[(CHEAPEST, refused)]
    assert REFUSED[refused] in run.get("error", ""), run


@needs_vllm
def test_worker_reports_a_failing_checkpoint(served):
    """A run that vLLM cannot load reports its error; the job goes on (the broken checkpoint runs
    last in the served job, after the others)."""
    _, _, run = served[BROKEN]
    assert run["error"] and "seconds" in run


# -- verify --engine vllm ---------------------------------------------------------------------
def _slice(tmp_path):
    from internvl_tools.io.slices import write_tsv

    from .support import make_items

    return write_tsv(make_items(4), tmp_path / "slice.tsv")


# the served cases each verify test reads its checkpoints from
VERIFY_CASES = {"test_verify_engine_vllm": [(CHEAPEST, "native"), (CHEAPEST, "w8a8")],
                "test_verify_engine_vllm_same_model": [(CHEAPEST, "native")]}


@needs_vllm
def test_verify_engine_vllm(served, tmp_path, run_cli):
    """The reference in our runtime, the candidate (the W8A8 copy) in vLLM: it drifts by what int8
    costs, the vision tower not at all, vLLM tokenized and tiled as the runtime; the report is verify's own."""
    reference, w8a8 = served[(CHEAPEST, "native")][0], served[(CHEAPEST, "w8a8")][0]
    quantized = run_cli("verify", reference, w8a8, "--bench", _slice(tmp_path), "--engine", "vllm", "--max-new-tokens", "4",
                        "--markdown", tmp_path / "r.md", "--json", "-")
    assert quantized.exit_code in (0, 1), quantized.output
    report = json.loads(quantized.output)
    assert report["engine"] == "vllm" and report["items"] == 4
    drift = report["overall"]
    assert 0 < drift["mean_kl"] < 0.05 and drift["image_cosine"] > 0.9999  # int8 LLM, vision untouched
    assert "(in vLLM)" in (tmp_path / "r.md").read_text()
    assert "tokenized or tiled differently" not in quantized.output


@needs_vllm
@FULL
def test_verify_engine_vllm_same_model(served, tmp_path, run_cli):
    """The same model in our runtime and in vLLM drifts by float noise only."""
    reference = served[(CHEAPEST, "native")][0]
    same = run_cli("verify", reference, reference, "--bench", _slice(tmp_path), "--engine", "vllm", "--max-new-tokens", "4",
                   "--json", "-")
    assert same.exit_code == 0, same.output
    report = json.loads(same.output)
    assert report["passed"] and report["engine"] == "vllm" and report["items"] == 4
    overall = report["overall"]
    assert overall["mean_kl"] < 1e-4 and overall["top1_agreement"] == 100.0 and overall["answer_agreement"] == 100.0
    assert overall["image_cosine"] > 0.9999


def test_verify_engine_vllm_without_its_environment(tiny, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv(vllm_engine.PYTHON_VARIABLE, str(tmp_path / "no-such-venv" / "bin" / "python"))
    result = run_cli("verify", tiny("InternVL2-1B"), tiny("InternVL2-1B"), "--bench", _slice(tmp_path), "--engine", "vllm")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no vLLM environment" in result.output and "scripts/setup_vllm.sh" in result.output
    onnx = run_cli("verify", tiny("InternVL2-1B"), "--bench", _slice(tmp_path), "--engine", "vllm", "--vision-onnx", tmp_path)
    assert onnx.exit_code == 2 and "--vision-onnx" in onnx.output


def test_verify_engine_vllm_says_a_gptq_candidate_runs_in_bf16(tiny, tmp_path, run_cli, monkeypatch):
    """--dtype fp32 (the default) with a GPTQ candidate: vLLM runs it in bf16 (see the served test above);
    verify says so in one warning line before anything runs, and the report records the dtype it ran in.
    vLLM itself is replaced by a stand-in that echoes the dtype it was started with (run_spec's choice)."""
    from internvl_tools.tiny.generator import make_checkpoint

    original = make_checkpoint("InternVL2-1B", tmp_path / "t", head_dim=32, shards=1)
    assert run_cli("convert", original, "-o", tmp_path / "hf").exit_code == 0
    gptq = tmp_path / "gptq"
    assert run_cli("quantize", tmp_path / "hf", "-o", gptq, "--method", "gptq", *CALIB).exit_code == 0

    def stand_in(runs, workdir=None, timeout=0, python=None):
        run = runs[0]
        results = [{"prompt_ids": [], "ids": [], "features": None,
                    "forced": [{"top": {str(i): 0.0}, "best": i} for i in r["forced_ids"]]} for r in run["requests"]]
        return {"runs": [{"model": run["model"], "dtype": run["dtype"], "results": results}]}

    monkeypatch.setattr(vllm_engine, "require_vllm_python", lambda: "python")
    monkeypatch.setattr(vllm_engine, "run_vllm", stand_in)
    common = ["--bench", _slice(tmp_path), "--engine", "vllm", "--max-new-tokens", "2", "--max-kl", "100", "--min-top1", "0",
              "--max-acc-drop", "100"]
    result = run_cli("verify", tmp_path / "hf", gptq, *common, "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "--dtype" in line]
    assert len(warnings) == 1 and "--dtype fp32" in warnings[0] and "bf16" in warnings[0] and "--dtype bf16" in warnings[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["dtype"], report["candidate_dtype"]) == ("fp32", "bf16")
    assert "(in vLLM, bf16, reference fp32)" in (tmp_path / "r.md").read_text()
    same = run_cli("verify", tmp_path / "hf", gptq, *common, "--dtype", "bf16", "--json", tmp_path / "s.json")
    assert same.exit_code == 0 and "--dtype" not in same.stderr, same.output
    assert json.loads((tmp_path / "s.json").read_text())["candidate_dtype"] == "bf16"


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
