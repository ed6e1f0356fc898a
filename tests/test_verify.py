"""`verify`: zero drift for an identical model, damaged models flagged, both slice formats,
malformed rows refused, the reference cache, and the torchrun split."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from internvl_tools.io.slices import BenchItem, read_slice, write_tsv
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.io.writer import CheckpointWriter
from internvl_tools.calibrate.samples import draw_image  # noqa: F401

from .support import make_items

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "InternVL2-1B"


@pytest.fixture(scope="module")
def slice_tsv(tmp_path_factory) -> Path:
    return write_tsv(make_items(), tmp_path_factory.mktemp("slice") / "slice.tsv")


def damaged(src: Path, out: Path, *, llm_noise: float = 0.0, vision_bits: int | None = None) -> Path:
    """A copy with noise on the LLM's linear weights or the vision tower rounded to a few bits."""
    g = torch.Generator().manual_seed(0)
    with CheckpointReader(src) as reader, CheckpointWriter(out, reader.specs(), inputs=[src]) as writer:
        for name in reader.keys():
            t = reader.get(name)
            if llm_noise and name.startswith("language_model.model.layers.") and t.dim() == 2:
                t = (t.float() + llm_noise * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)
            if vision_bits and name.startswith("vision_model.") and t.dim() >= 2:
                levels = 2 ** (vision_bits - 1) - 1
                scale = t.float().abs().amax() / levels
                t = (torch.round(t.float() / scale).clamp(-levels, levels) * scale).to(t.dtype)
            writer.write(name, t)
        writer.finalize(side_files_from=src)
    return out


def run_verify(run_cli, ref, cand, bench, *extra):
    result = run_cli("verify", ref, cand, "--bench", bench, "--json", "-", *extra)
    report = json.loads(result.output) if result.exit_code in (0, 1) else None
    return result, report


@pytest.mark.requires("matplotlib")  # --plot
def test_identical_model_zero_drift(tiny, slice_tsv, run_cli, tmp_path):
    result, report = run_verify(run_cli, tiny(FAMILY), tiny(FAMILY), slice_tsv, "--markdown", tmp_path / "r.md",
                                "--plot", tmp_path / "r.png")
    assert result.exit_code == 0 and report["passed"]
    overall = report["overall"]
    assert overall["n"] == 6 and overall["mean_kl"] == 0.0 and overall["top1_agreement"] == 100.0
    assert overall["answer_agreement"] == 100.0 and overall["image_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert overall["ref_accuracy"] == overall["cand_accuracy"]
    assert set(report["categories"]) == {"shape", "color"} and report["categories"]["shape"]["n"] == 2
    assert "| overall | 6 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_noisy_llm_flagged(tiny, slice_tsv, run_cli, tmp_path):
    cand = damaged(tiny(FAMILY), tmp_path / "noisy", llm_noise=1.0)
    result, report = run_verify(run_cli, tiny(FAMILY), cand, slice_tsv)
    assert result.exit_code == 1 and not report["passed"]
    assert report["overall"]["mean_kl"] > 0.001 and report["overall"]["top1_agreement"] < 50
    assert any("top-1" in f for f in report["failures"])
    strict, _ = run_verify(run_cli, tiny(FAMILY), cand, slice_tsv, "--min-top1", "0", "--max-kl", "0.001")
    assert strict.exit_code == 1 and "mean KL" in strict.output


def test_two_bit_vision_flagged(tiny, slice_tsv, run_cli, tmp_path):
    cand = damaged(tiny(FAMILY), tmp_path / "vision2", vision_bits=2)
    result, report = run_verify(run_cli, tiny(FAMILY), cand, slice_tsv)
    assert result.exit_code == 1
    assert report["overall"]["image_cosine"] < 0.99 and any("image embeddings" in f for f in report["failures"])


def test_int8_candidate_and_reference_cache(tiny, slice_tsv, run_cli, tmp_path, monkeypatch):
    cand = tmp_path / "int8"
    assert run_cli("quantize", tiny(FAMILY), "-o", cand, "--method", "int8").exit_code == 0
    cache = tmp_path / "cache"
    first, report = run_verify(run_cli, tiny(FAMILY), cand, slice_tsv, "--ref-cache", cache, "--max-kl", "1", "--min-top1", "0")
    assert first.exit_code == 0, first.output
    assert len(list(cache.glob("reference-*.pt"))) == 1
    assert 0 < report["overall"]["mean_kl"] < 0.05 and report["overall"]["image_cosine"] == pytest.approx(1.0, abs=1e-6)
    import internvl_tools.evaluate.verify as verify

    monkeypatch.setattr(verify, "run_reference", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reference ran again")))
    again, cached = run_verify(run_cli, tiny(FAMILY), cand, slice_tsv, "--ref-cache", cache, "--max-kl", "1", "--min-top1", "0")
    assert again.exit_code == 0 and cached["rows"] == report["rows"]


def test_jsonl_slice(tiny, run_cli, tmp_path):
    items = make_items(3, seed=1)
    lines = []
    for item in items:
        item.image.save(tmp_path / f"{item.index}.png")
        lines.append(json.dumps({"index": item.index, "image": f"{item.index}.png", "question": item.question,
                                 "answer": item.answer, "category": item.category, "options": item.options}))
    (tmp_path / "slice.jsonl").write_text("\n".join(lines))
    assert [i.kind for i in read_slice(tmp_path / "slice.jsonl")] == ["multiple_choice", "yes_no", "short"]
    result, report = run_verify(run_cli, tiny(FAMILY), tiny(FAMILY), tmp_path / "slice.jsonl")
    assert result.exit_code == 0 and report["overall"]["n"] == 3


def test_malformed_rows_exit_2(tiny, slice_tsv, run_cli, tmp_path):
    lines = slice_tsv.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[1] = "not*base64"
    (tmp_path / "bad.tsv").write_text("\n".join([lines[0], lines[1], "\t".join(cells)]))
    result = run_cli("verify", tiny(FAMILY), tiny(FAMILY), "--bench", tmp_path / "bad.tsv")
    assert result.exit_code == 2 and "row 3" in result.output and "base64" in result.output
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "no answer"}\n')
    result = run_cli("verify", tiny(FAMILY), tiny(FAMILY), "--bench", tmp_path / "bad.jsonl")
    assert result.exit_code == 2 and "bad.jsonl:2: needs 'question'" in result.output
    cells = lines[1].split("\t")
    cells[-2] = "Z"  # an answer that is not an option
    (tmp_path / "bad2.tsv").write_text("\n".join([lines[0], "\t".join(cells)]))
    result = run_cli("verify", tiny(FAMILY), tiny(FAMILY), "--bench", tmp_path / "bad2.tsv")
    assert result.exit_code == 2 and "row 2" in result.output and "'Z'" in result.output


def test_scoring():
    from internvl_tools.evaluate.verify import score

    mc = BenchItem("1", "q", "B", None, {"A": "cat", "B": "dog"})
    assert score(mc, "B") and score(mc, "The answer is B.") and score(mc, "dog") and not score(mc, "A")
    yn = BenchItem("2", "q", "yes")
    assert score(yn, "Yes, it is.") and not score(yn, "No")
    short = BenchItem("3", "q", "the red car")
    assert score(short, "Red car.") and not score(short, "blue car")


def test_torchrun_two_processes_match_single(tiny, slice_tsv, tmp_path, run_cli):
    import sys

    import socket

    single, report = run_verify(run_cli, tiny(FAMILY), tiny(FAMILY), slice_tsv)
    out = tmp_path / "dist.json"
    with socket.socket() as probe:  # a free port: a fixed one may be held by another run on the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "internvl_tools", "verify",
                           str(tiny(FAMILY)), str(tiny(FAMILY)), "--bench", str(slice_tsv), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    distributed = json.loads(out.read_text())
    assert distributed["overall"] == report["overall"]
    assert [r["index"] for r in distributed["rows"]] == [r["index"] for r in report["rows"]]
    assert distributed["rows"] == report["rows"]


def run_verify_onnx(run_cli, ref, export, bench, *extra):
    result = run_cli("verify", ref, "--vision-onnx", export, "--bench", bench, "--json", "-", *extra)
    return result, json.loads(result.output) if result.exit_code in (0, 1) else None


@pytest.mark.requires("onnx", "onnxruntime")
@pytest.mark.parametrize("dtype,kl", [("fp32", 1e-6), ("fp16", 1e-3)])
def test_vision_onnx_with_the_reference_llm(tiny, slice_tsv, run_cli, tmp_path, dtype, kl):
    export = tmp_path / "vit"
    assert run_cli("export", tiny(FAMILY), "-o", export, "--dtype", dtype, "--no-check").exit_code == 0
    result, report = run_verify_onnx(run_cli, tiny(FAMILY), export, slice_tsv)
    assert result.exit_code == 0 and report["passed"] and report["vision_onnx"] == str(export)
    overall = report["overall"]
    assert overall["image_cosine"] > 0.9999 and overall["mean_kl"] < kl and overall["top1_agreement"] == 100.0
    assert overall["answer_agreement"] == 100.0


@pytest.mark.requires("onnx", "onnxruntime")
def test_vision_onnx_damaged_tower_flagged_and_mismatch_refused(tiny, slice_tsv, run_cli, tmp_path):
    bad = damaged(tiny(FAMILY), tmp_path / "vision2", vision_bits=2)
    export = tmp_path / "vit2"
    assert run_cli("export", bad, "-o", export, "--dtype", "fp32", "--no-check").exit_code == 0
    result, report = run_verify_onnx(run_cli, tiny(FAMILY), export, slice_tsv)
    assert result.exit_code == 1 and report["overall"]["image_cosine"] < 0.99
    tower_only = tmp_path / "tower"  # features before the projector cannot feed the LLM
    assert run_cli("export", tiny(FAMILY), "-o", tower_only, "--part", "vision", "--no-check").exit_code == 0
    result, _ = run_verify_onnx(run_cli, tiny(FAMILY), tower_only, slice_tsv)
    assert result.exit_code == 2 and "--part vision+projector" in result.output
    from internvl_tools.errors import InputError
    from internvl_tools.export.onnx_runner import OnnxVision

    with CheckpointReader(tiny(FAMILY)) as reader:
        config = reader.config()
    config["llm_config"]["hidden_size"] *= 2  # another checkpoint's LLM width
    with pytest.raises(InputError, match="export the vision tower of this checkpoint"):
        OnnxVision(export, config)
    missing = run_cli("verify", tiny(FAMILY), "--bench", slice_tsv)
    assert missing.exit_code == 2 and "missing CANDIDATE" in missing.output


def test_topk_kl_is_never_negative():
    """Two nearly equal distributions: float32 rounding made the top-k + rest KL dip below 0 (verify printed a
    negative mean_kl); it is computed in float64 and clamped at 0, and still equals the exact value elsewhere."""
    from internvl_tools.evaluate.verify import topk_kl

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g)
    ref = torch.log_softmax(logits, -1)
    near = torch.log_softmax(logits + 1e-6 * torch.randn(64, 500, generator=g), -1)
    top = ref.topk(10, dim=-1)
    assert (topk_kl(top.values, near.gather(-1, top.indices)) >= 0).all()
    far = torch.log_softmax(logits + torch.randn(64, 500, generator=g), -1)  # full vocabulary: the exact KL
    exact = (ref.exp().double() * (ref.double() - far.double())).sum(-1)
    assert torch.allclose(topk_kl(ref, far), exact, atol=1e-6)
