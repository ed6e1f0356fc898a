"""GPTQ: the math against round-to-nearest, the v1 format against an independent dequantizer,
the layer-by-layer runner on every LLM dialect, resume, recipes, and loading in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from internvl_tools.calibrate.gptq_quantizer import GPTQJob, quantize_gptq
from internvl_tools.calibrate.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, rtn_quantize
from internvl_tools.formats.gptq import pack, unpack

from .support import all_tensors, sample_image

ROOT = Path(__file__).resolve().parent.parent
TINY_GPTQ = ["--method", "gptq", "--group-size", "32", "--num-samples", "6", "--seq-len", "96"]


def independent_dequantize(qweight, qzeros, scales, g_idx, bits):
    """The GPTQ v1 layout read with numpy bit operations (not the package's unpacker)."""
    qw = qweight.numpy().view(np.uint32)
    qz = qzeros.numpy().view(np.uint32)
    per, mask = 32 // bits, (1 << bits) - 1
    ints = np.zeros((qw.shape[0] * per, qw.shape[1]), dtype=np.int64)
    for row in range(ints.shape[0]):
        ints[row] = (qw[row // per] >> (bits * (row % per))) & mask
    zeros = np.zeros((qz.shape[0], qz.shape[1] * per), dtype=np.int64)
    for col in range(zeros.shape[1]):
        zeros[:, col] = ((qz[:, col // per] >> (bits * (col % per))) & mask) + 1  # stored as zero - 1
    g = g_idx.numpy()
    w = (ints - zeros[g]) * scales.float().numpy()[g]
    return torch.from_numpy(w.T.astype(np.float32)), ints


def _problem(seed=0, rows=96, cols=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.2)  # correlated inputs
    w = torch.randn(rows, cols, generator=g) * 0.05
    acc = HessianAccumulator(cols)
    for part in x.split(300):
        acc.add(part)
    return w, x, acc.h


def test_hessian_is_running_average():
    w, x, h = _problem()
    torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("cfg", [GPTQConfig(4, 128, True, False), GPTQConfig(4, 64, False, True), GPTQConfig(8, -1, True, False),
                                 GPTQConfig(4, 32, True, True)])
def test_gptq_beats_round_to_nearest(cfg):
    w, x, h = _problem()
    gptq, rtn = gptq_quantize(w, h, cfg), rtn_quantize(w, cfg)
    err = lambda result: ((x @ (w - result.dequantize()).T) ** 2).mean()
    assert err(gptq) < 0.8 * err(rtn)
    assert gptq.q.min() >= 0 and gptq.q.max() <= 2**cfg.bits - 1


@pytest.mark.parametrize("cfg", [GPTQConfig(4, 64, True, False), GPTQConfig(4, 64, False, True), GPTQConfig(8, 128, False, False)])
def test_packing_read_back_by_independent_dequantizer(cfg):
    w, _, h = _problem(1)
    result = gptq_quantize(w, h, cfg)
    packed = pack(result, cfg.bits)
    rows, cols = w.shape
    groups = cols // cfg.group_size
    assert packed["qweight"].shape == (cols * cfg.bits // 32, rows) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (groups, rows * cfg.bits // 32) and packed["scales"].shape == (groups, rows)
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    theirs, ints = independent_dequantize(**packed, bits=cfg.bits)
    assert np.array_equal(ints.T, result.q.numpy())
    assert torch.equal(theirs, result.dequantize())
    assert torch.equal(unpack(**packed, bits=cfg.bits), theirs)
    if cfg.desc_act:
        assert not torch.equal(packed["g_idx"], torch.arange(cols, dtype=torch.int32) // cfg.group_size)
    # within the expected error: GPTQ moves weights by about a quantization step at most
    step = (packed["scales"].float()[packed["g_idx"].long()]).T
    assert ((theirs - w).abs() <= 2.5 * step).float().mean() > 0.99


@pytest.fixture(scope="module")
def gptq_tiny(tiny, tmp_path_factory):
    cache = {}

    def get(family, *extra):
        key = (family, extra)
        if key not in cache:
            from click.testing import CliRunner

            from internvl_tools.cli.main import cli

            out = tmp_path_factory.mktemp("gptq") / family
            result = CliRunner().invoke(cli, ["quantize", str(tiny(family)), "-o", str(out), *TINY_GPTQ, *extra, "--json"])
            assert result.exit_code == 0, result.output
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("family", ["InternVL2-Llama3-76B", "InternVL2-1B", "InternVL2-4B", "InternVL2-2B", "InternVL-Chat-V1-2",
                                    "InternVL3.5-1B", "InternVL3-9B-InternLM3"])
def test_runner_on_every_dialect(family, tiny, gptq_tiny):
    out = gptq_tiny(family)
    src, dst = all_tensors(tiny(family)), all_tensors(out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["checkpoint_format"] == "gptq"
    assert qc["dynamic"] == {"-:.*vision_model.*": {}, "-:.*mlp1.*": {}} and qc["block_name_to_quantize"] == "language_model.model.layers"
    linears = [k for k, t in src.items() if k.startswith("language_model.model.layers.") and t.dim() == 2]
    assert linears
    for key in linears:
        stem = key.removesuffix(".weight")
        assert key not in dst
        w, _ = independent_dequantize(dst[stem + ".qweight"], dst[stem + ".qzeros"], dst[stem + ".scales"], dst[stem + ".g_idx"], 4)
        original = src[key].float()
        assert w.shape == original.shape
        assert (w - original).norm() / original.norm() < 0.25, key
    for key, tensor in src.items():
        if key not in linears:
            assert torch.equal(dst[key], tensor), key  # vision, mlp1, embeddings, norms, head untouched


def test_quantized_model_runs_close_to_bf16(tiny, gptq_tiny):
    from internvl_tools.runtime.model import InternVLRuntime

    bf16, q4 = InternVLRuntime(tiny("InternVL2-Llama3-76B")), InternVLRuntime(gptq_tiny("InternVL2-Llama3-76B"))
    pixels = bf16.pixel_values(sample_image(7))
    ids = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    want, got = bf16.logits(ids, pixels), q4.logits(ids, pixels)
    assert torch.equal(q4.image_features(pixels), bf16.image_features(pixels))
    assert (got - want).norm() / want.norm() < 0.3


def test_resume_continues_from_last_finished_layer(tiny, tmp_path):
    job = GPTQJob(GPTQConfig(4, 32), num_samples=4, seq_len=64)
    whole = quantize_gptq(tiny("InternVL2-40B"), tmp_path / "whole", job, max_shard_size=10**9)

    class Stop(Exception):
        pass

    def interrupt(done):
        if done == 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        quantize_gptq(tiny("InternVL2-40B"), out, job, max_shard_size=10**9, progress=interrupt)
    state = json.loads((tmp_path / "resumed.partial" / ".gptq_state.json").read_text())
    assert state["layers_done"] == 2 and not out.exists()
    seen = []
    quantize_gptq(tiny("InternVL2-40B"), out, job, max_shard_size=10**9, resume=True, progress=seen.append)
    assert seen == [3]  # only the last layer ran again
    assert all_tensors(out).keys() == all_tensors(whole).keys()
    for key, tensor in all_tensors(whole).items():
        assert torch.equal(all_tensors(out)[key], tensor), key
    assert not (tmp_path / "resumed.partial").exists() and not (out / ".gptq_state.json").exists()


def test_resume_onto_another_run_s_partial_starts_fresh_saying_why(tiny, tmp_path):
    """--resume onto OUT.partial of another method, --format or input: one warning line naming why,
    then a fresh start; --resume with no partial at all: one note line. (Each run stops after its
    first layer: what is said comes before.)"""
    from internvl_tools.calibrate.awq import AWQConfig
    from internvl_tools.calibrate.awq_quantizer import AWQJob, quantize_awq

    class Stop(Exception):
        pass

    def stop(done):
        raise Stop

    out, partial = tmp_path / "q", tmp_path / "q.partial"
    gptq = GPTQJob(GPTQConfig(4, 32), num_samples=2, seq_len=32)

    def said(run, source, job):
        lines = []
        with pytest.raises(Stop):
            run(tiny(source), out, job, max_shard_size=10**9, resume=True, progress=stop, log=lines.append)
        assert json.loads(next(partial.glob(".*_state.json")).read_text())["layers_done"] == 1  # started afresh
        return [line for line in lines if "--resume" in line]

    assert said(quantize_gptq, "InternVL2-1B", gptq) == ["note: --resume: there is no q.partial to resume; starting from the first layer"]
    awq = AWQJob(AWQConfig(group_size=32, zero_point=False), fmt="compressed-tensors", num_samples=2, seq_len=32)
    assert said(quantize_awq, "InternVL2-1B", awq) == [
        f"warning: --resume: {partial} is not resumed: it was started by --method gptq (now awq); starting fresh"]
    gptq_ct = GPTQJob(GPTQConfig(4, 32), fmt="compressed-tensors", num_samples=2, seq_len=32)
    assert said(quantize_gptq, "InternVL2-1B", gptq_ct) == [
        f"warning: --resume: {partial} is not resumed: it was started by --method awq (now gptq); starting fresh"]
    assert said(quantize_gptq, "InternVL2-1B", gptq) == [
        f"warning: --resume: {partial} is not resumed: it was started with --format compressed-tensors (now gptq); starting fresh"]
    assert said(quantize_gptq, "InternVL2-2B", gptq) == [
        f"warning: --resume: {partial} is not resumed: it was started from another input ({tiny('InternVL2-1B').resolve()}); "
        "starting fresh"]
    assert [p.name for p in partial.glob(".*_state.json")] == [".gptq_state.json"]  # nothing of the earlier runs left


def test_recipe_and_command_line_override(tiny, tmp_path, run_cli):
    recipe = ROOT / "recipes" / "internvl2-llama3-76b-gptq-w4g128.yaml"
    result = run_cli("quantize", tiny("InternVL2-Llama3-76B"), "-o", tmp_path / "r", "--recipe", recipe,
                     "--group-size", "32", "--num-samples", "4", "--seq-len", "64", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stderr: the --seq-len 64 warning (samples cut)
    assert summary["method"] == "gptq" and summary["bits"] == 4 and summary["group_size"] == 32 and summary["sym"] is True
    for name in ("internvl2-llama3-76b-gptq-w4g128.yaml", "internvl-chat-v1-2-gptq-w4g128.yaml"):
        import yaml

        values = yaml.safe_load((ROOT / "recipes" / name).read_text())
        assert values["method"] == "gptq" and values["bits"] == 4 and values["group_size"] == 128
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: gptq\nbitz: 4\n")
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "x", "--recipe", bad)
    assert result.exit_code == 2 and "bitz" in result.output


def test_calibration_folder(tiny, tmp_path, run_cli):
    folder = tmp_path / "calib"
    folder.mkdir()
    sample_image(8).save(folder / "a.png")
    rows = [{"image": "a.png", "prompt": "What is shown?", "answer": "Noise."}, {"text": "Plain text sample for calibration."},
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Colours."}]}]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "c", *TINY_GPTQ, "--calib", folder)
    assert result.exit_code == 0, result.output
    (folder / "data.jsonl").write_text('{"image": "missing.png", "prompt": "x"}\n')
    bad = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "d", *TINY_GPTQ, "--calib", folder)
    assert bad.exit_code == 2 and "data.jsonl:1" in bad.output


def test_bad_input(tiny, tmp_path, gptq_tiny, run_cli):
    def refused(*args, needle):
        result = run_cli("quantize", *args)
        assert result.exit_code == 2 and needle in result.output, result.output
        assert result.output.strip().count("\n") == 0

    refused(gptq_tiny("InternVL2-1B"), "-o", tmp_path / "a", *TINY_GPTQ, needle="already quantized")
    refused(tiny("InternVL2-1B"), "-o", tmp_path / "c", *TINY_GPTQ, "--only", "vision_model", needle="InternViT-6B produces nonsense")
    refused(tiny("InternVL2-1B"), "-o", tmp_path / "d", *TINY_GPTQ, "--device", "cuda", needle="CUDA") if not torch.cuda.is_available() else None
    refused(tiny("InternVL2-1B", lora="embedded"), "-o", tmp_path / "e", *TINY_GPTQ, needle="merge-lora")
    refused(tiny("InternVL2-1B"), "-o", tmp_path / "f", needle="--method")


GPTQ_PYTHON = ROOT / ".venv-gptq" / "bin" / "python"
LOAD_SCRIPT = """
import sys, json, torch
from transformers import AutoModelForImageTextToText
model, info = AutoModelForImageTextToText.from_pretrained(sys.argv[1], output_loading_info=True, device_map="cpu")
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "linear": type(model.model.language_model.layers[0].mlp.down_proj).__name__,
                  "vision": type(model.model.vision_tower.encoder.layer[0].attention.q_proj).__name__,
                  "logits": logits[0].tolist()}))
"""


@pytest.mark.skipif(not GPTQ_PYTHON.exists(), reason="GPTQ loading needs .venv-gptq (scripts/setup_gptq.sh: optimum + gptqmodel)")
@pytest.mark.parametrize("family", ["InternVL2-Llama3-76B", "InternVL2-1B"])
def test_transformers_loads_gptq_output(family, tiny, gptq_tiny, tmp_path, run_cli):
    """quantize (original) -> convert --to hf -> transformers + optimum + gptqmodel on CPU."""
    from internvl_tools.runtime.model import InternVLRuntime

    native = tmp_path / "hf"
    assert run_cli("convert", gptq_tiny(family), "-o", native).exit_code == 0
    ids = list(range(1, 25))
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    proc = subprocess.run([str(GPTQ_PYTHON), "-c", LOAD_SCRIPT, str(native), json.dumps(ids)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["linear"] != "Linear" and report["vision"] == "Linear"
    theirs = torch.tensor(report["logits"])
    ours = InternVLRuntime(gptq_tiny(family)).logits(torch.tensor([ids]))[0]
    bf16 = InternVLRuntime(tiny(family)).logits(torch.tensor([ids]))[0]
    assert (theirs - ours).norm() / ours.norm() < 0.03  # same weights, their kernels in bf16
    assert (theirs - bf16).norm() / bf16.norm() < 0.5  # random tiny weights quantize poorly; see the SmolLM2 benchmark


def test_sigterm_stops_like_ctrl_c_and_resume_finishes(tiny, tmp_path, run_cli, monkeypatch):
    """SIGTERM (a scheduler's kill, `timeout`) mid-run: the same one-line notice as Ctrl-C, exit 143,
    OUT.partial kept and OUT absent; --resume then finishes, equal to an uninterrupted run."""
    import os
    import signal

    from internvl_tools.calibrate import pipeline

    whole = tmp_path / "whole"
    args = ["--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "48"]
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", whole, *args).exit_code == 0
    real = pipeline.quantize_layer

    def then_terminated(*a, **k):
        acts = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return acts

    monkeypatch.setattr(pipeline, "quantize_layer", then_terminated)
    out = tmp_path / "q"
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", out, *args)
    assert result.exit_code == 143 and "terminated: q.partial keeps the finished layers" in result.output
    assert not out.exists() and (tmp_path / "q.partial").is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.setattr(pipeline, "quantize_layer", real)
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", out, *args, "--resume").exit_code == 0
    for key, tensor in all_tensors(whole).items():
        assert torch.equal(all_tensors(out)[key], tensor), key
