"""Calibration data: the built-in set (kinds, languages, aspect ratios, multi-turn, determinism,
shipped photos), --calib reading the files verify reads, the calibration record quantize writes,
and verify refusing a slice the candidate was calibrated on."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from internvl_tools.calibrate import builtin
from internvl_tools.calibrate.samples import (ROWS_FILE, Sample, builtin_samples, builtin_samples_v1, calibration_record,
                                              describe, draw_image, load_calibration, short_answer_turns)
from internvl_tools.errors import InputError
from internvl_tools.io.slices import MC_SUFFIX, SHORT_SUFFIX, YES_NO_SUFFIX, BenchItem, prompt_of, row_fingerprint, write_tsv

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
    assert record["set"] == "builtin-v3" and record["samples"] == 40 and sum(record["kinds"].values()) == 40
    assert record["seed"] == 0 and len(rows) <= 40 and rows == sorted(rows)
    assert record["short_answer"] == sum(short_answer_turns(s) > 0 for s in forty) > 0
    line = describe(record)
    assert line.startswith("the built-in set (builtin-v3, seed 0), 40 samples (photo 8,")
    assert f"), {record['short_answer']} with short-answer questions" in line


# -- short-answer VQA turns in verify's formats (builtin-v3) -----------------------------------
FORMATS = {MC_SUFFIX: "multiple_choice", YES_NO_SUFFIX: "yes_no", SHORT_SUFFIX: "short"}


def short_turns(samples):
    """(kind, format, question without verify's decoration, options, answer) of every short-answer turn."""
    out = []
    for sample in samples:
        for question, answer in [(sample.question, sample.answer), *sample.turns]:
            suffix = next((s for s in FORMATS if question.endswith("\n" + s)), None)
            if suffix is None:
                continue
            body = question[: -len(suffix) - 1]
            options = {}
            if FORMATS[suffix] == "multiple_choice":
                assert body.startswith("Question: ") and "\nOptions:\n" in body
                body, listed = body.removeprefix("Question: ").split("\nOptions:\n")
                options = dict(line.split(". ", 1) for line in listed.split("\n"))
                assert prompt_of(BenchItem("", body, answer, None, options)) == question
            else:
                assert prompt_of(BenchItem("", body, answer)) == question  # verify asks exactly this
            out.append((sample.kind, FORMATS[suffix], body, options, answer))
    return out


@pytest.fixture(scope="module")
def default_set():
    return builtin_samples(128, seed=0)


def test_short_answer_turns_are_a_third_of_the_pictures_in_verify_formats(default_set):
    turns = short_turns(default_set)
    assert {kind for kind, *_ in turns} == {"photo", "document", "chart", "table", "ocr", "multi_turn"}
    single = [s for s in default_set if s.image is not None and not s.turns]
    share = sum(short_answer_turns(s) > 0 for s in single) / len(single)
    assert 0.3 <= share <= 0.45  # 5 of the 13 single-picture samples of every block of 20
    assert all(short_answer_turns(s) == 1 and len(s.turns) >= 1 for s in default_set if s.kind == "multi_turn")
    assert not any(short_answer_turns(s) for s in default_set if s.image is None)  # text samples unchanged
    formats = Counter(fmt for _, fmt, *_ in turns)
    assert all(formats[f] >= 8 for f in FORMATS.values()), formats
    yes_no = Counter(answer for _, fmt, _, _, answer in turns if fmt == "yes_no")
    assert set(yes_no) == {"Yes", "No"} and abs(yes_no["Yes"] - yes_no["No"]) <= 1  # alternating: balanced
    assert all(answer in options and len(options) >= 3 and sorted(options) == list("ABCD")[: len(options)]
               for _, fmt, _, options, answer in turns if fmt == "multiple_choice")
    words = [answer for _, fmt, _, _, answer in turns if fmt == "short"]
    assert all(len(answer.split()) <= 3 and answer.lower() not in ("yes", "no") for answer in words)
    assert sum(answer.rstrip("%").replace(".", "").isdigit() for answer in words) >= 4  # numbers too
    assert sum(bool(CJK.search(body)) for _, _, body, _, _ in turns) >= 4  # some asked in Chinese


def test_short_answer_turns_are_deterministic_and_v2_is_kept(default_set):
    again = short_turns(builtin_samples(40, seed=0))
    assert again == short_turns(default_set[:40])
    assert again != short_turns(builtin_samples(40, seed=1))
    old = builtin_samples(20, seed=0, version="builtin-v2")
    assert [s.kind for s in old] == [s.kind for s in default_set[:20]]  # the same schedule, drawn the same way
    assert not any(short_answer_turns(s) for s in old)
    with pytest.raises(ValueError, match="builtin-v9"):
        builtin_samples(1, version="builtin-v9")


def resolve(fmt, options, answer):
    return options[answer] if fmt == "multiple_choice" else answer


def expect_chart(facts, question):
    labels, values = facts["labels"], facts["values"]
    value = dict(zip(labels, (f"{v}%" if facts["unit"] == "percent" else str(v) for v in values)))
    number = dict(zip(labels, values))
    if question in ("Which category has the highest value?", "图表中哪一项的数值最大？"):
        return labels[values.index(max(values))]
    if question == "Which category has the lowest value?":
        return labels[values.index(min(values))]
    if question in ("How many categories does the chart show?", "图表中有几个类别？"):
        return str(len(labels))
    if question == "What is the title of the chart?":
        return facts["title"]
    if question == "What type of chart is this?":
        return f"{facts['kind']} chart"
    if m := re.fullmatch(r"What is the value of (.+)\?|(.+)的数值是多少？", question):
        return value[m[1] or m[2]]
    if m := re.fullmatch(r"Is the value of (.+) higher than the value of (.+)\?|(.+)的数值比(.+)高吗？", question):
        a, b = (m[1], m[2]) if m[1] else (m[3], m[4])
        return "Yes" if number[a] > number[b] else "No"
    if m := re.fullmatch(r"Is this a (\w+) chart\?", question):
        return "Yes" if m[1] == facts["kind"] else "No"
    m = re.fullmatch(r'Is the title of the chart "(.+)"\?', question)
    return "Yes" if m[1] == facts["title"] else "No"


def expect_table(facts, question):
    header, rows = facts["header"], facts["rows"]
    cells = {(r[0], h): v for r in rows for h, v in zip(header, r)}
    if m := re.fullmatch(r"In the row of (.+), what is the (.+)\?|表格中(.+)这一行的(.+)是多少？", question):
        return cells[(m[1], m[2]) if m[1] else (m[3], m[4])]
    if question in ("How many rows of data does the table have, not counting the header?", "这个表格有几行数据（不含表头）？"):
        return str(len(rows))
    if question == "How many columns does the table have?":
        return str(len(header))
    if re.fullmatch(r"Which \w+ has the largest .+\?", question):
        last = [float(r[-1]) for r in rows]
        return rows[last.index(max(last))][0]
    if m := re.fullmatch(r"Is (.+) listed in the table\?|表格中有(.+)吗？", question):
        return "Yes" if (m[1] or m[2]) in [r[0] for r in rows] else "No"
    if m := re.fullmatch(r"In the row of (.+), is the (.+) (\S+)\?", question):
        return "Yes" if cells[(m[1], m[2])] == m[3] else "No"
    m = re.fullmatch(r"Does the table have (\d+) rows of data, not counting the header\?", question)
    return "Yes" if int(m[1]) == len(rows) else "No"


def expect_ocr(text, kind, facts, question):
    colours = {"黑色": "black", "白色": "white"}
    if question in ("What does the sign say?", "图片中的文字是什么？"):
        return text
    if question == "What is the serial number on the label?":
        return text.removeprefix("SN ")
    if question == "What color is the board behind the text?":
        return facts["board"]
    if question == "What color are the letters?":
        return facts["ink"].capitalize()
    if m := re.fullmatch(r'Does the text in the image say "(.+)"\?', question):
        return "Yes" if m[1] == text else "No"
    if m := re.fullmatch(r"Is the text written in (\w+) letters\?|图中的文字是(.+)的吗？", question):
        return "Yes" if (m[1] or colours[m[2]]) == facts["ink"] else "No"
    if question in ("What is the total amount on the receipt?", "这张收据的总金额是多少？"):
        return facts["total"]
    if question in ("How many items are listed on the receipt?", "收据上有几件商品？"):
        return str(len(facts["items"]))
    if question == "What is the name of the shop?":
        return facts["shop"]
    m = re.fullmatch(r"Is (.+) on the receipt\?|收据上有(.+)吗？", question)
    return "Yes" if (m[1] or m[2]) in facts["items"] else "No"


def test_short_answers_are_true_of_the_drawn_content():
    """Every short-answer turn, checked against the facts of what was drawn (not against the generator's code)."""
    rng = random.Random(3)
    ask = builtin.Asker(rng)
    checked = Counter()
    for _ in range(30):
        _, facts = builtin.render_chart(rng)
        _, table = builtin.render_table(rng)
        _, text, kind, ocr = builtin.render_ocr(rng, fit=True)
        title = rng.choice(builtin.DOC_TOPICS)[0]
        for _ in range(4):
            for name, turn, expect in [
                    ("chart", builtin.chart_short(ask, facts), lambda q: expect_chart(facts, q)),
                    ("table", builtin.table_short(ask, table), lambda q: expect_table(table, q)),
                    (kind, builtin.ocr_short(ask, text, kind, ocr), lambda q: expect_ocr(text, kind, ocr, q)),
                    ("document", builtin.document_short(ask, title), lambda q: {
                        "What is the title of this document?": title, "这个文档的标题是什么？": title,
                        "What kind of document is this?": " ".join(w for w in title.split(":")[0].split() if not w.isdigit()),
                        "Is this document written in English?": "Yes", "Is the text of this page printed?": "Yes",
                        "Is this document written in Chinese?": "No", "Is this page handwritten?": "No",
                        "Does this page contain a photograph?": "No"}.get(q) or ("Yes" if re.search(r'[“"](.+)[”"]', q)[1] == title else "No"))]:
                ((_, fmt, question, options, answer),) = short_turns([Sample(*turn, None, name)])
                assert resolve(fmt, options, answer) == expect(question), (name, question, options, answer)
                checked[name] += 1
    assert checked["chart"] == checked["table"] == checked["document"] == 120 and checked["receipt"] and checked["label"]


def test_photo_questions_keep_the_photo_whole():
    """Short-answer photo facts (PHOTO_VQA) are asked of a mild crop at the size nearest the photo's own shape."""
    assert all({a for _, a, o in facts if not o} >= {"Yes", "No"} for facts in builtin.PHOTO_VQA.values())
    assert set(builtin.PHOTO_VQA) == set(builtin.PHOTOS)
    rng = random.Random(0)
    for name in ("chelsea", "rocket", "cell", "text"):
        source = Image.open(builtin.DATA / f"{name}.jpg")
        image = builtin.load_photo(rng, name, whole=True)
        assert abs(math.log(image.width / image.height) - math.log(source.width / source.height)) < 0.35
    ask = builtin.Asker(rng)
    for _ in range(40):
        name = rng.choice(builtin.photo_names())
        ((_, fmt, question, options, answer),) = short_turns([Sample(*builtin.photo_short(ask, name), None, "photo")])
        known = {(q, a) for q, a, o in builtin.PHOTO_VQA[name]}
        assert (question, resolve(fmt, options, answer)) in known


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
    assert record["method"] == "gptq" and record["bits"] == 4 and record["set"] == "builtin-v3" and record["samples"] == 6
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
    assert "GPTQ 4-bit calibrated on the built-in set (builtin-v3, seed 0), 6 samples" in line and "--calib" in line
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
