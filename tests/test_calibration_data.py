"""Calibration data: the built-in set (kinds, languages, aspect ratios, multi-turn, determinism,
shipped photos), --calib reading the files verify reads, the calibration record quantize writes,
and verify refusing a slice the candidate was calibrated on."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from internvl_tools.calibrate import builtin
from internvl_tools.calibrate.samples import (ROWS_FILE, Sample, builtin_samples, builtin_samples_v1, calibration_record,
                                              describe, draw_image, load_calibration)
from internvl_tools.errors import InputError
from internvl_tools.io.slices import BenchItem, row_fingerprint, write_tsv

FAMILY = "InternVL2-1B"
TINY_GPTQ = ["--method", "gptq", "--group-size", "32", "--num-samples", "6", "--seq-len", "96"]
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def forty():
    return builtin_samples(40, seed=0)


def test_builtin_set_covers_every_kind_language_and_shape(forty):
    kinds = Counter(s.kind for s in forty)
    assert set(kinds) == set(builtin.KINDS)
    assert kinds["photo"] == 8 and kinds["text_en"] == 6  # the schedule's proportions, two full blocks
    pictures = [s.image for s in forty if s.image is not None]
    ratios = {round(p.width / p.height, 2) for p in pictures}
    assert len(ratios) >= 4 and any(r > 1.4 for r in ratios) and any(r < 0.8 for r in ratios)  # wide and tall: tiling
    assert max(p.width * p.height for p in pictures) > 448 * 448 * 2
    assert all(s.image is None for s in forty if s.kind.startswith("text_"))
    assert any(CJK.search(s.question + s.answer) for s in forty if s.kind == "text_zh")
    assert any(CJK.search(s.question + s.answer) for s in forty if s.image is not None)  # Chinese about pictures too
    assert all(s.turns for s in forty if s.kind == "multi_turn")


def test_builtin_set_is_deterministic_and_seeded(forty):
    again = builtin_samples(40, seed=0)
    assert [s.fingerprint() for s in again] == [s.fingerprint() for s in forty]
    other = builtin_samples(40, seed=1)
    assert [s.fingerprint() for s in other] != [s.fingerprint() for s in forty]
    assert len(builtin_samples(7, seed=0)) == 7


def test_shipped_photos_are_small_and_licensed():
    photos = sorted(builtin.DATA.glob("*.jpg"))
    assert {p.stem for p in photos} == set(builtin.PHOTOS)
    assert sum(p.stat().st_size for p in photos) < 2 * 2**20
    licences = (builtin.DATA / "LICENSES.md").read_text()
    assert all(f"| {p.name} |" in licences for p in photos)


def test_missing_photos_fall_back_to_charts(monkeypatch):
    monkeypatch.setattr(builtin, "DATA", Path("/nonexistent"))
    samples = builtin_samples(20, seed=0)
    assert len(samples) == 20 and not any(s.kind == "photo" for s in samples)


def test_v1_set_is_kept_for_comparison():
    old = builtin_samples_v1(4)
    assert [s.kind for s in old] == ["shapes", "text_en", "shapes", "text_en"]


def test_multi_turn_renders_in_the_model_template():
    sample = Sample("What is it?", "A cat.", None, "multi_turn", (("Its colour?", "Orange."), ("几只？", "一只。")))
    text = sample.text("Hermes-2")
    assert text.count("<|im_start|>user\n") == 3 and text.count("<|im_start|>assistant\n") == 3
    assert text.endswith("<|im_start|>assistant\n一只。<|im_end|>")
    vicuna = sample.text("vicuna_v1.1")
    assert "USER: Its colour? ASSISTANT: Orange." in vicuna
    single = Sample("Hi", "Hello.")
    assert single.text("Hermes-2").endswith("<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello.<|im_end|>")


def test_record_counts_kinds_and_describes_itself(forty):
    record, rows = calibration_record(forty, None, 0)
    assert record["set"] == "builtin-v2" and record["samples"] == 40 and sum(record["kinds"].values()) == 40
    assert record["seed"] == 0 and len(rows) <= 40 and rows == sorted(rows)
    assert describe(record).startswith("the built-in set (builtin-v2, seed 0), 40 samples (photo 8,")


# -- --calib reads what verify reads ---------------------------------------------------------
def items(count: int, seed: int = 0) -> list[BenchItem]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        image, color, shape = draw_image(rng)
        image = image.resize((image.width // 8, image.height // 8))
        out.append(BenchItem(str(i), "What shape is shown?", "B", image, {"A": "circle", "B": shape, "C": "star", "D": "line"}, "shape")
                   if i % 2 == 0 else BenchItem(str(i), f"Is the object {color}?", "yes", image, {}, "color"))
    return out


def as_jsonl(rows: list[BenchItem], folder: Path, name: str = "rows.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in rows:
        item.image.save(folder / f"{item.index}.png")
        lines.append(json.dumps({"index": item.index, "image": f"{item.index}.png", "question": item.question,
                                 "answer": item.answer, "options": item.options}))
    (folder / name).write_text("\n".join(lines))
    return folder / name


def test_calib_reads_tsv_jsonl_and_folders_with_the_same_fingerprints(tmp_path):
    rows = items(4)
    tsv = write_tsv(rows, tmp_path / "slice.tsv")
    jsonl = as_jsonl(rows, tmp_path / "jl")
    from_tsv, from_jsonl = load_calibration(tsv, 10), load_calibration(jsonl, 10)
    assert [s.fingerprint() for s in from_tsv] == [s.fingerprint() for s in from_jsonl] == \
        [row_fingerprint(i.question, i.image) for i in rows]
    assert "Options:\nA. circle" in from_tsv[0].question and from_tsv[0].answer == "B"  # the prompt verify asks
    assert from_tsv[1].question.endswith("Please answer yes or no.") and from_tsv[1].kind == "slice"
    (tmp_path / "jl" / "more.jsonl").write_text("\n".join([
        json.dumps({"text": "plain text"}), json.dumps({"prompt": "Say hi", "answer": "hi"}),
        json.dumps({"conversations": [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
                                      {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]})]))
    folder = load_calibration(tmp_path / "jl", 100)
    assert [s.kind for s in folder] == ["text", "prompt", "multi_turn", "slice", "slice", "slice", "slice"]
    assert folder[2].question == "q1" and folder[2].turns == (("q2", "a2"),)
    assert len(load_calibration(tmp_path / "jl", 2)) == 2


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothing", "no such file"),
    (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "not a .csv"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no *.jsonl or *.tsv"),
    (lambda p: (p / "bad.jsonl").write_text('{"foo": 1}') and p / "bad.jsonl", "bad.jsonl:1: needs"),
    (lambda p: (p / "opt.jsonl").write_text('{"question": "q", "answer": "E", "options": {"A": "x"}}') and p / "opt.jsonl",
     "not one of the options"),
])
def test_bad_calib_inputs_are_named(tmp_path, make, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_calibration(make(tmp_path), 4)


# -- the record in the output and verify's checks -------------------------------------------
@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory):
    """(built-in GPTQ output, its --json summary, slice-calibrated output, calibration rows, test rows)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    root = tmp_path_factory.mktemp("calibrated")
    rows = items(10)
    calib_tsv = write_tsv(rows[:6], root / "calib.tsv")
    runner = CliRunner()
    default = runner.invoke(cli, ["quantize", str(tiny(FAMILY)), "-o", str(root / "builtin"), *TINY_GPTQ, "--json"],
                            catch_exceptions=False)
    assert default.exit_code == 0, default.output
    sliced = runner.invoke(cli, ["quantize", str(tiny(FAMILY)), "-o", str(root / "sliced"), *TINY_GPTQ, "--calib", str(calib_tsv)],
                           catch_exceptions=False)
    assert sliced.exit_code == 0, sliced.output
    assert "calibrated on " + str(calib_tsv) + ", 6 samples (slice 6)" in " ".join(sliced.output.split())
    return root / "builtin", json.loads(default.stdout), root / "sliced", rows[:6], rows[6:]


def test_quantize_records_the_calibration(calibrated):
    builtin_out, summary, sliced, calib_rows, _ = calibrated
    record = json.loads((builtin_out / "config.json").read_text())["quantization_calibration"]
    assert record == summary["calibration"]
    assert record["method"] == "gptq" and record["bits"] == 4 and record["set"] == "builtin-v2" and record["samples"] == 6
    assert sum(record["kinds"].values()) == 6 and "built-in set" in summary["detail"]
    rows = json.loads((sliced / ROWS_FILE).read_text())
    assert rows["calibration"]["source"].endswith("calib.tsv")
    assert set(rows["rows"]) == {row_fingerprint(i.question, i.image) for i in calib_rows}


def test_verify_refuses_a_slice_the_candidate_was_calibrated_on(tiny, calibrated, run_cli, tmp_path):
    _, _, sliced, calib_rows, test_rows = calibrated
    overlapping = write_tsv(test_rows + calib_rows[:1], tmp_path / "overlap.tsv")
    refused = run_cli("verify", tiny(FAMILY), sliced, "--bench", overlapping)
    assert refused.exit_code == 2
    assert "1 of 5 rows (first: index 0) are in the calibration set" in refused.output and "--allow-overlap" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    forced = run_cli("verify", tiny(FAMILY), sliced, "--bench", overlapping, "--allow-overlap", "--max-kl", "100",
                     "--min-top1", "0", "--max-acc-drop", "100", "--json", tmp_path / "r.json")
    assert forced.exit_code == 0 and "warning:" in forced.output
    assert json.loads((tmp_path / "r.json").read_text())["calibration_overlap"] == ["0"]
    clean = write_tsv(test_rows, tmp_path / "clean.tsv")
    passed = run_cli("verify", tiny(FAMILY), sliced, "--bench", clean, "--max-kl", "100", "--min-top1", "0",
                     "--max-acc-drop", "100", "--json", "-")
    assert passed.exit_code == 0 and json.loads(passed.output)["hint"] is None


def test_failing_report_names_the_calibration(tiny, calibrated, run_cli, tmp_path):
    builtin_out, _, _, _, test_rows = calibrated
    clean = write_tsv(test_rows, tmp_path / "clean.tsv")
    result = run_cli("verify", tiny(FAMILY), builtin_out, "--bench", clean, "--max-kl", "0", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 1
    line = next(l for l in result.output.splitlines() if l.startswith("note:"))
    assert "GPTQ 4-bit calibrated on the built-in set (builtin-v2, seed 0), 6 samples" in line and "--calib" in line
    assert "Note: the candidate is GPTQ 4-bit" in (tmp_path / "r.md").read_text()


def test_fewer_calib_rows_than_num_samples_is_said_and_recorded(tiny, tmp_path, run_cli):
    """--num-samples above the rows --calib holds: calibrated on all the rows, one warning line, and the
    summary / --json / config.json record the number actually used."""
    calib = write_tsv(items(3), tmp_path / "three.tsv")
    result = run_cli("quantize", tiny(FAMILY), "-o", tmp_path / "q", *TINY_GPTQ, "--calib", calib, "--json")
    assert result.exit_code == 0, result.output
    # (the other warning: --seq-len 96 cuts these samples)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "--seq-len" not in line]
    assert len(warnings) == 1 and "holds 3 rows, fewer than --num-samples 6" in warnings[0] and str(calib) in warnings[0]
    summary = json.loads(result.stdout)
    assert summary["calibration"]["samples"] == 3 and "3 samples" in summary["detail"]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_calibration"]["samples"] == 3
