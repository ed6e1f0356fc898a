"""The GPU acceptance run's dry run (`bash benchmarks/gpu_acceptance.sh --cpu`) end to end, so the
GPU run is not the script's first run; plus the comparisons it draws its verdicts from.

The dry run takes about 20-40 s on 2 cores (a forkserver imports torch once; every step runs tiny
checkpoints). It is never skipped on its own: deselect it explicitly with
`-m "not gpu_acceptance"` or `--deselect tests/test_gpu_acceptance.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"

pytestmark = pytest.mark.gpu_acceptance


def _steps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_acceptance_steps

    return gpu_acceptance_steps


def _orchestrator():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_acceptance

    return gpu_acceptance


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module: (its JSON document, its out folder, its work folder, seconds)."""
    root = tmp_path_factory.mktemp("gpu-acceptance")
    out, work = root / "out", root / "work"
    env = {**os.environ, "GPU_ACCEPTANCE_PYTHON": sys.executable, "OUT": str(out)}
    started = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--work", str(work), "--keep-work", "--budget", "150"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads((out / "gpu_acceptance.json").read_text())
    return document, out, work, seconds, proc.stdout


def _rows(document, step=None, contains=""):
    return [r for r in document["rows"] if (step is None or r["step"] == step) and contains in r["check"]]


def test_dry_run_end_to_end(dry_run):
    document, out, _work, seconds, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_acceptance.json", "gpu_acceptance.log", "gpu_acceptance.md"]
    statuses = {r["status"] for r in document["rows"]}
    assert statuses <= {"pass", "info", "skipped", "not available"}, [r for r in document["rows"] if r["status"] not in
                                                                      ("pass", "info", "skipped", "not available")]
    assert document["mode"] == "cpu dry run" and document["seconds"] < document["budget_seconds"]
    # every device step ran, and every comparison is exact when both runs are on the same CPU
    for method in ("gptq", "awq"):
        dev = _rows(document, method, "--device cpu: InternVL2-Llama3-76B tiny (main)")
        assert [r["status"] for r in dev] == ["pass", "pass"], dev  # the device run and the CPU reference
        compare = _rows(document, method, "vs CPU packed tensors")
        assert len(compare) == 1 and compare[0]["status"] == "pass" and compare[0]["data"]["exact"], compare
        assert compare[0]["data"]["codes"] > 0
    assert _rows(document, "export", "TensorRT")[0]["status"] == "not available"
    parity = _rows(document, "export", "vs PyTorch")
    assert len(parity) == 3 and all(r["status"] == "pass" and r["data"]["relative_error"] < 1e-2 for r in parity)
    int8 = _rows(document, "int8", "int8 (bnb)")
    if int8 and int8[-1]["status"] != "not available":
        assert int8[-1]["status"] == "pass" and int8[-1]["data"]["top1"] >= 0.9
    assert _rows(document, "int8", "bf16 on cpu")[0]["status"] == "pass"
    assert [r["status"] for r in _rows(document, "vllm", "our runtime on")] == ["pass"] * 3
    assert _rows(document, "vllm", "vLLM generate")[0]["status"] == "not available"
    # the real-weights steps (SmolLM2 GPTQ: minutes on a CPU) are left to --real-weights; verify says its stand-in
    assert [r["status"] for r in _rows(document, "real weights")] == ["skipped"]
    verify = _rows(document, "verify")
    assert verify[0]["status"] == "pass" and verify[0]["data"]["samples_per_second"] > 0
    assert "tiny stand-in (no real-weights model)" in verify[0]["check"]
    markdown = (out / "gpu_acceptance.md").read_text()
    assert "| step | check | status |" in markdown and "torch" in markdown
    assert "| step | check | status |" in stdout  # the table is printed too (the device tool shows the output's tail)
    print(f"dry run: {seconds:.1f} s")


def test_comparison_counts_differing_codes(dry_run, tmp_path):
    """compare_quantized counts changed codes and scales; code by code without a source (AWQ's
    verdict), by each linear's quantization error with one (GPTQ's)."""
    from safetensors.torch import load_file, save_file

    steps = _steps()
    _document, _out, work, _seconds, _stdout = dry_run
    dev, cpu, source = work / "main-gptq-dev", work / "main-gptq-cpu", work / "main"
    same = steps.compare_quantized(dev, cpu, source)
    assert same["exact"] and same["error_change_max"] == 0 and len(same["quantization_error"]) == 3 * 7

    def perturbed(name: str, fraction: float, scale_factor: float = 1.0, weights: str = "layers.0.mlp.down_proj.qweight") -> Path:
        copy = tmp_path / name
        shutil.copytree(dev, copy)
        for shard in sorted(copy.glob("*.safetensors")):
            tensors = load_file(shard)
            changed = False
            for key, value in tensors.items():
                if key.endswith(weights):
                    flat = value.view(-1)
                    count = max(1, int(flat.numel() * fraction))
                    flat[:count] = flat[:count] ^ 1  # one 4-bit code of each changed int32 moves by one step
                    changed = True
                if key.endswith("layers.0.mlp.down_proj.scales") and scale_factor != 1.0:
                    tensors[key] = (value.float() * scale_factor).to(value.dtype)
                    changed = True
            if changed:
                save_file(tensors, shard, metadata={"format": "pt"})
        return copy

    one = steps.compare_quantized(perturbed("one", 0.0), cpu)
    assert one["codes_differing"] == 1 and one["codes_max_step"] == 1 and one["passed"] and not one["exact"]
    many = steps.compare_quantized(perturbed("many", 1.0), cpu)
    down = 64 * 96 // 8  # int32 words of the tiny down_proj qweight, one code changed in each
    assert many["codes_differing"] == down and abs(many["codes_differing_fraction"] - down / many["codes"]) < 1e-9
    assert not many["passed"] and any("dequantized weights differ" in f for f in many["failures"])  # 0.8% of codes: within 1%
    everywhere = steps.compare_quantized(perturbed("everywhere", 1.0, weights=".qweight"), cpu)
    assert 0.1 < everywhere["codes_differing_fraction"] < 0.13  # one code of 8 in every qweight word
    assert any("of the codes differ" in f for f in everywhere["failures"])
    scaled_path = perturbed("scaled", 0.0, 1.5)
    scaled = steps.compare_quantized(scaled_path, cpu)
    assert not scaled["passed"] and scaled["float_max_rel"] > 0.3 and "scales" in scaled["float_worst_key"]
    # GPTQ's verdict: the same codes with 1.5x scales make that linear's quantization error far larger
    judged = steps.compare_quantized(scaled_path, cpu, source)
    assert not judged["passed"] and judged["error_change_worst_key"].endswith("layers.0.mlp.down_proj.weight")
    assert judged["error_change_max"] > 0.5 and "quantization error" in steps.describe_comparison(judged)


def test_vllm_verdicts(tmp_path):
    """Equal tokens pass, a near-tie divergence passes with a note, any other divergence fails."""
    orchestrator = _orchestrator()
    job = {"models": [{"name": name, "requests": [{"runtime_ids": [5, 6, 7, 2], "stop_ids": [2]}]} for name in ("same", "tie", "off")]}
    results = {"vllm": "x", "models": [
        {"name": "same", "quantization": "gptq", "requests": [{"ids": [5, 6, 7, 2], "logprobs": []}]},
        {"name": "tie", "quantization": "awq", "requests": [{"ids": [5, 9, 7], "logprobs": [{}, {"9": -0.70, "6": -0.75}]}]},
        {"name": "off", "quantization": "compressed-tensors", "requests": [{"ids": [5, 9, 7], "logprobs": [{}, {"9": -0.1, "6": -3.0}]}]},
    ]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "results.json").write_text(json.dumps(results))
    rows = orchestrator.compare_vllm(tmp_path / "job.json", tmp_path / "results.json", 0, 1.0, "")
    assert [r["status"] for r in rows] == ["pass", "pass", "FAIL"]
    assert "near-tie at token 1" in rows[1]["result"] and "differ from token 1" in rows[2]["result"]


def test_budget_used_up_still_writes_the_table(tmp_path):
    """A budget too small for any step: every step is a row, the table is written, exit 0."""
    env = {**os.environ, "GPU_ACCEPTANCE_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--budget", "5"], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    assert [r["status"] for r in document["rows"]][:2] == ["skipped", "skipped"]
    assert document["rows"][-1]["status"] == "FAIL" and "missing" in document["rows"][-1]["result"]
