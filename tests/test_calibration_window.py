"""Calibration data within --seq-len (calibrate/window.py): the content of every sample reaches the
model (system prompt left out when it takes more than half of the window, images tiled with fewer
tiles rather than split, the end cut), a --seq-len with no room for any content is refused, a
lossy one warned about; and .jsonl rows with wrongly typed fields or non-UTF-8 bytes are one-line
errors for quantize --calib and verify --bench alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_tools.calibrate.pipeline import fit_window
from internvl_tools.calibrate.samples import Sample, builtin_samples, load_calibration
from internvl_tools.errors import InputError
from internvl_tools.formats.views import open_view
from internvl_tools.io.slices import read_slice
from internvl_tools.models.templates import IMG_CONTEXT
from internvl_tools.runtime.model import InternVLRuntime
from tests.support import all_bytes, sample_image

FAMILY = "InternVL2-1B"
GPTQ = ["--method", "gptq", "--group-size", "32", "--num-samples", "2"]


@pytest.fixture(scope="module")
def window_of(tiny):
    """window_of(samples, seq_len) -> calibrate.window.Window on the tiny InternVL2-1B (its tokenizer and tiling)."""
    checkpoint = tiny(FAMILY)

    def fit(samples, seq_len):
        with open_view(checkpoint, native_dialect=True) as reader:
            return fit_window(reader, reader.config(), samples, seq_len)

    return fit


@pytest.fixture(scope="module")
def runtime(tiny):
    return InternVLRuntime(tiny(FAMILY), dtype=None, load_llm=False, load_vision=False)


def test_short_window_keeps_the_content_not_the_system_prompt(window_of, runtime):
    samples = builtin_samples(6)
    window = window_of(samples, 48)
    system = window.system_tokens
    assert system > 48  # the tiny tokenizer spells the Chinese system prompt byte by byte
    context = runtime.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    for fitted in window.used:
        assert len(fitted.ids) <= 48 and not fitted.system
        text = runtime.tokenizer.decode(fitted.ids)
        assert text.startswith("<|im_start|>user\n")  # not "<|im_start|>system\n..."
        # an image is whole: every IMG_CONTEXT of its tiles, then </img>
        assert fitted.ids.count(context) == fitted.tiles * runtime.tokens_per_tile
        if fitted.tiles:
            assert "</img>" in text
    assert [f.sample for f in window.used] == samples and window.dropped == []
    record = window.record()
    assert (record["seq_len"], record["tokens"], record["system_prompt_dropped"], record["dropped"]) == (48, 6 * 48, 6, 0)
    # the content differs between samples: no two windows alike
    assert len({tuple(f.ids) for f in window.used}) == 6


def test_long_window_keeps_the_system_prompt_and_every_tile(window_of, runtime):
    samples = builtin_samples(6)
    window = window_of(samples, 4096)
    assert window.warning() is None and window.record()["cut"] == 0 and window.record()["system_prompt_dropped"] == 0
    for fitted, sample in zip(window.used, samples):
        tiles = runtime.pixel_values(sample.image).shape[0] if sample.image is not None else 0
        assert fitted.tiles == tiles and fitted.system
        assert fitted.ids == runtime.tokenizer(sample.text("Hermes-2", runtime.tokens_per_tile, tiles)).input_ids


def test_an_image_is_tiled_smaller_rather_than_split(window_of, runtime):
    image = sample_image(3, (1344, 448))  # a wide picture: several tiles + thumbnail at the checkpoint's tiling
    sample = Sample("What is shown?", "Noise. " * 40, image, "prompt")
    big = window_of([sample], 4096).used[0]
    small = window_of([sample], 24).used[0]
    assert big.tiles == runtime.pixel_values(image).shape[0] > 1 and not big.retiled
    assert small.tiles == 1 and small.retiled and small.max_tiles == 1
    context = runtime.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert small.ids.count(context) == runtime.tokens_per_tile


def test_no_room_for_any_content_is_refused_with_the_minimum(window_of):
    with pytest.raises(InputError) as refused:
        window_of(builtin_samples(2), 4)
    message = str(refused.value)
    assert message.startswith("--seq-len 4 leaves no room for the calibration data") and "\n" not in message
    minimum = int(message.split("pass --seq-len >= ")[1].split()[0])
    assert window_of(builtin_samples(2), minimum).used  # the named minimum is accepted


def test_lossy_window_warns_with_the_count(window_of):
    samples = [Sample("", "short text"), Sample("Continue:", "a long text " * 60)]
    window = window_of(samples, 100)
    line = window.warning()
    assert line.startswith("warning: --seq-len 100: 1 of 2 calibration samples lose content (1 end cut")
    assert "\n" not in line and f"--seq-len {window.whole_from()} keeps every sample whole" in line
    assert window_of(samples, window.whole_from()).warning() is None


def test_samples_whose_image_cannot_fit_are_dropped_and_later_ones_stand_in(runtime):
    """Real tiles (256 tokens each) in a 128-token window: no image fits whole even at one tile."""
    from internvl_tools.calibrate.window import fit_samples

    tokenizer = runtime.tokenizer

    def fit(samples, count=None):
        return fit_samples(samples, 128, "Hermes-2", lambda text: tokenizer(text).input_ids, 256, runtime.config,
                           tokenizer.convert_tokens_to_ids(IMG_CONTEXT), tokenizer.convert_tokens_to_ids("</img>"), count)

    with pytest.raises(InputError, match=r"image at one tile 258 more .*; pass --seq-len >= 263 "):
        fit(builtin_samples(2))  # both have pictures
    window = fit(builtin_samples(20), count=2)
    assert [f.sample.kind for f in window.used] == ["text_en", "text_zh"] and all(f.tiles == 0 for f in window.used)
    assert len(window.dropped) > 0 and all(d.sample.image is not None for d in window.dropped)
    assert "dropped: no room for their images or any content (later samples stand in)" in window.warning()


def test_quantize_lets_later_samples_stand_in(tiny, tmp_path, monkeypatch):
    """The pipeline end to end with 256-token tiles (a real checkpoint's) at --seq-len 128: the first two
    built-in samples (pictures) are dropped, the set's first text samples stand in; the record says so."""
    from internvl_tools.calibrate.gptq import GPTQConfig
    from internvl_tools.calibrate.gptq_quantizer import GPTQQuantizer
    from internvl_tools.calibrate.pipeline import CalibrationJob, quantize_calibrated

    monkeypatch.setattr("internvl_tools.runtime.model.image_tokens_per_tile", lambda config: 256)
    lines = []
    out = quantize_calibrated(tiny(FAMILY), tmp_path / "q", GPTQQuantizer(GPTQConfig(4, 32)),
                              CalibrationJob(num_samples=2, seq_len=128), max_shard_size=10**9, log=lines.append)
    record = json.loads((out / "config.json").read_text())["quantization_calibration"]
    assert record["samples"] == 2 and record["kinds"] == {"text_en": 1, "text_zh": 1} and 0 < record["tokens"] <= 2 * 128
    assert record["dropped"] >= 2 and record["with_images"] == 0
    assert len([line for line in lines if line.startswith("warning: --seq-len 128")]) == 1


# -- quantize: the data reaches the model ---------------------------------------------------
def test_different_calibration_data_gives_different_outputs_at_a_short_seq_len(tiny, tmp_path, run_cli):
    outputs = []
    for name, rows in (("a", [{"text": "The quick brown fox jumps over the lazy dog near the river bank."},
                              {"prompt": "Count to ten.", "answer": "1 2 3 4 5 6 7 8 9 10"}]),
                       ("b", [{"text": "def f(x):\n    return [i * i for i in range(x) if i % 3]"},
                              {"prompt": "Name three colours.", "answer": "Red, green and blue."}])):
        calib = tmp_path / f"{name}.jsonl"
        calib.write_text("\n".join(json.dumps(r) for r in rows))
        out = tmp_path / f"q{name}"
        result = run_cli("quantize", tiny(FAMILY), "-o", out, *GPTQ, "--seq-len", "32", "--calib", calib, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["calibration"]["samples"] == 2 and 0 < summary["calibration"]["tokens"] <= 64
        outputs.append(all_bytes(out))
    assert outputs[0].keys() == outputs[1].keys()
    differing = [k for k in outputs[0] if outputs[0][k] != outputs[1][k]]
    assert any(k.endswith("qweight") for k in differing)


def test_quantize_refuses_a_seq_len_without_room_before_writing(tiny, tmp_path, run_cli):
    out = tmp_path / "q"
    result = run_cli("quantize", tiny(FAMILY), "-o", out, *GPTQ, "--seq-len", "3")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --seq-len 3 leaves no room") and "pass --seq-len >= " in lines[0]
    assert not out.exists() and not out.with_name("q.partial").exists()


def test_quantize_warns_and_records_what_was_used(tiny, tmp_path, run_cli):
    result = run_cli("quantize", tiny(FAMILY), "-o", tmp_path / "q", *GPTQ, "--seq-len", "32")
    assert result.exit_code == 0, result.output
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning: --seq-len 32")]
    assert len(warnings) == 1 and "2 of 2 calibration samples lose content" in warnings[0]
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_calibration"]
    assert record["samples"] == 2 and record["seq_len"] == 32 and record["tokens"] == 64 and record["cut"] == 2
    assert "2 samples (" in result.stdout and "64 tokens (--seq-len 32; 2 cut)" in " ".join(result.stdout.split())


# -- .jsonl rows: wrong types and bytes are one-line errors, for --calib and --bench alike --------
BAD_ROWS = [
    ('{"prompt": 5}', "field 'prompt' is a number"),
    ('{"text": 5}', "field 'text' is a number"),
    ('{"image": 5, "prompt": "x", "answer": "y"}', "field 'image' is a number"),
    ('{"conversations": "str"}', "field 'conversations' is a string"),
    ('{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}', "field 'conversations[0].value'"),
    ('{"conversations": ["hi"]}', "field 'conversations[0]' is a string"),
    ('{"question": "q", "answer": "A", "options": "notadict"}', "field 'options' is a string"),
    ('{"question": "q", "answer": "A", "options": {"A": [1]}}', "field 'options.A' is a list"),
    ('{"question": ["q"], "answer": "A"}', "field 'question' is a list"),
    ('{"question": "q", "answer": null}', "field 'answer' is null"),
    (b'{"text": "caf\xe9"}', "not UTF-8 text (byte 0xe9)"),
]


def _write(path: Path, row) -> Path:
    good = b'{"question": "What is it?", "answer": "yes"}\n'
    path.write_bytes(good + (row if isinstance(row, bytes) else row.encode()) + b"\n")
    return path


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_wrongly_typed_rows_are_named_by_both_readers(tmp_path, row, message):
    path = _write(tmp_path / "rows.jsonl", row)
    for read in (lambda: load_calibration(path, 10), lambda: read_slice(path)):
        with pytest.raises(InputError) as refused:
            read()
        text = str(refused.value)
        assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("row, message", [BAD_ROWS[0], BAD_ROWS[6], BAD_ROWS[-1]])
def test_quantize_and_verify_refuse_bad_rows_in_one_line(tiny, tmp_path, run_cli, row, message):
    path = _write(tmp_path / "rows.jsonl", row)
    out = tmp_path / "q"
    for args in (("quantize", tiny(FAMILY), "-o", out, *GPTQ, "--seq-len", "32", "--calib", path),
                 ("verify", tiny(FAMILY), tiny(FAMILY), "--bench", path)):
        result = run_cli(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {path}:2: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no OUT, no OUT.partial


def test_refusal_names_the_whole_length_of_the_samples_it_would_calibrate(tiny):
    """The refusal's "keeps every sample whole" figure is of the first `count` samples (those the
    warning of a roomier --seq-len counts), not of every stand-in sample tried after them."""
    import re

    with open_view(tiny("InternVL2-1B")) as reader:
        config = reader.config()
        samples = builtin_samples(4 * 6, 0)
        window = fit_window(reader, config, samples[:6], 64, 6)
        with pytest.raises(InputError) as refused:
            fit_window(reader, config, samples, 4, 6)
    whole = int(re.search(r"\(>= (\d+) keeps every sample whole\)", str(refused.value)).group(1))
    assert whole == window.whole_from()
