"""`convert --to hf` writes a folder that transformers' AutoProcessor (InternVLProcessor) and vLLM
use as it is: tokenizer attributes, chat template, GotOcr2 image processor, processor config.

The tests that need torchvision (the processor's image / video processors) run in .venv-proc
(scripts/setup_processor.sh) through tests/processor_check.py; they skip without it. The rest
runs here: files, JSON fields, tokenizer attributes, the chat template against the runtime's prompt.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from internvl_tools.models.processor_files import FILES, IMAGENET_MEAN, IMAGENET_STD, MULTIMODAL_TOKENS, chat_template
from internvl_tools.models.templates import TEMPLATES, build_prompt, get_template
from internvl_tools.runtime.model import InternVLRuntime

from .conftest import ALL_FAMILIES
from .support import sample_image

ROOT = Path(__file__).resolve().parent.parent
PROC_PYTHON = ROOT / ".venv-proc" / "bin" / "python"
# one family per LLM dialect, and a ps_version v1 one
DIALECTS = {"llama": "InternVL2-Llama3-76B", "qwen2": "InternVL2-1B", "internlm2": "InternVL2-2B", "phi3": "InternVL2-4B",
            "llama-v1": "InternVL-Chat-V1-2"}
QUESTION = "Describe the image in detail."


@pytest.fixture(scope="module")
def native(tiny, tmp_path_factory):
    """native(family) -> the `convert --to hf` output of the tiny checkpoint (cached)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp("proc") / family
            result = CliRunner().invoke(cli, ["convert", str(tiny(family)), "-o", str(out)])
            assert result.exit_code == 0, result.output
            cache[family] = out
        return cache[family]

    return get


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _original_config(folder: Path) -> dict:
    return _json(folder / "internvl_original.json")["config"]


def _tokens_per_tile(config: dict) -> int:
    size = config["force_image_size"]
    return int((size // config["vision_config"]["patch_size"]) ** 2 * config["downsample_ratio"] ** 2)


# -- here (.venv): files, fields, tokenizer, chat template -----------------------------------

@pytest.mark.parametrize("family", sorted(set(DIALECTS.values())))
def test_processor_files_and_fields(family, native):
    out = native(family)
    config = _original_config(out)
    for name in ("chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    processor = _json(out / "processor_config.json")
    assert processor == {"processor_class": "InternVLProcessor", "image_seq_length": _tokens_per_tile(config)}
    assert processor["image_seq_length"] == _json(out / "config.json")["image_seq_length"]
    image = _json(out / "preprocessor_config.json")
    size = config["force_image_size"]
    dynamic = config["dynamic_image_size"]
    assert image["image_processor_type"] == "GotOcr2ImageProcessorFast" and "feature_extractor_type" not in image
    assert image["processor_class"] == "InternVLProcessor"
    assert image["crop_to_patches"] is dynamic
    assert (image["min_patches"], image["max_patches"]) == ((config["min_dynamic_patch"], config["max_dynamic_patch"]) if dynamic else (1, 1))
    assert image["size"] == {"height": size, "width": size}
    assert image["image_mean"] == IMAGENET_MEAN and image["image_std"] == IMAGENET_STD and image["resample"] == 3
    assert image["do_rescale"] and image["do_normalize"] and image["do_resize"]
    video = _json(out / "video_preprocessor_config.json")
    assert video["video_processor_type"] == "InternVLVideoProcessor" and video["size"] == image["size"]
    tok_config = _json(out / "tokenizer_config.json")
    assert tok_config["extra_special_tokens"] == MULTIMODAL_TOKENS and tok_config["processor_class"] == "InternVLProcessor"
    assert "chat_template" not in tok_config
    stop = get_template(config["template"]).stop
    tokenizer = _json(out / "tokenizer.json")
    stop_id = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}[stop]
    assert stop_id in _json(out / "generation_config.json")["eos_token_id"]


@pytest.mark.parametrize("family", sorted(set(DIALECTS.values())))
def test_tokenizer_carries_multimodal_tokens(family, native, tiny):
    from transformers import AutoTokenizer

    out = native(family)
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(tiny(family))
    assert (tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.context_image_token, tokenizer.video_token) == (
        "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    assert tokenizer.context_image_token_id == _json(out / "config.json")["image_token_id"]
    assert tokenizer.start_image_token_id == original.convert_tokens_to_ids("<img>")
    assert tokenizer.end_image_token_id == original.convert_tokens_to_ids("</img>")
    # vLLM asserts the video token is one token; it comes after every id the original has
    assert tokenizer.encode("<video>", add_special_tokens=False) == [tokenizer.video_token_id]
    assert tokenizer.video_token_id == len(original)
    # everything else tokenizes as before
    runtime = InternVLRuntime(tiny(family), load_llm=False, load_vision=False)
    text = build_prompt(runtime.config["template"], QUESTION, runtime.tokens_per_tile, 3)
    assert tokenizer(text).input_ids == original(text).input_ids


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_chat_template_renders_the_runtime_prompt(family, native):
    """apply_chat_template + the processor's expansion of <IMG_CONTEXT> = the runtime's prompt text."""
    from transformers import AutoTokenizer

    out = native(family)
    config = _original_config(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    per_tile = _tokens_per_tile(config)
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(with_image, tokenize=False, add_generation_prompt=True)
    assert text.count("<IMG_CONTEXT>") == 1
    for tiles in (1, 7):
        expanded = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * per_tile * tiles + "</img>")
        assert expanded == build_prompt(config["template"], QUESTION, per_tile, tiles)
    plain = [{"role": "user", "content": QUESTION}]
    assert tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == build_prompt(config["template"], QUESTION)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_multi_turn_and_system(name):
    """Every template: turns and a system message as InternVL's conversation.py joins them."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    record = get_template(name)
    render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template(name)).render
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    system = record.system.format(system_message="be brief")
    if record.user == "USER":  # vicuna: seps " " and "</s>"
        expected = f"{system} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    else:
        expected = f"{system}{record.sep}{record.user}q1{record.sep}{record.assistant}a1{record.sep}{record.user}q2{record.sep}{record.assistant}"
    assert render(messages=[{"role": "system", "content": "be brief"}, *turns], add_generation_prompt=True) == expected
    default = render(messages=turns[:1], add_generation_prompt=True)
    assert default == record.prompt("q1")
    assert not render(messages=turns[:1], add_generation_prompt=False).endswith(record.assistant)


def test_remote_code_tokenizer_and_unexpressible_settings(tiny, copy_of, tmp_path, run_cli):
    """A tokenizer class of remote code (InternLM2Tokenizer) becomes the fast tokenizer the folder has
    (the native folder carries no code); dynamic tiles without a thumbnail are named in a warning."""
    from transformers import AutoTokenizer

    from internvl_tools.models.processor_files import image_processor_config

    source = copy_of(tiny("InternVL2-2B"))
    path = source / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="InternLM2Tokenizer", auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})
    path.write_text(json.dumps(config))
    assert run_cli("convert", source, "-o", tmp_path / "hf").exit_code == 0
    written = _json(tmp_path / "hf" / "tokenizer_config.json")
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in written
    assert AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=False).context_image_token == "<IMG_CONTEXT>"
    original = _json(source / "config.json")
    assert image_processor_config(original)[1] == []
    _, warnings = image_processor_config({**original, "use_thumbnail": False})
    assert len(warnings) == 1 and "thumbnail" in warnings[0]


def test_v1_conversion_warns_on_stderr(tiny, tmp_path):
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    v1 = CliRunner().invoke(cli, ["convert", str(tiny("InternVL-Chat-V1-2")), "-o", str(tmp_path / "v1")])
    assert v1.exit_code == 0, v1.output
    lines = [line for line in v1.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "ps_version v1" in lines[0] and "pixel_values.transpose(-1, -2)" in lines[0], v1.stderr
    assert "warning:" not in v1.stdout
    v2 = CliRunner().invoke(cli, ["convert", str(tiny("InternVL2-1B")), "-o", str(tmp_path / "v2"), "--json"])
    assert v2.exit_code == 0 and "warning:" not in v2.stderr


def test_round_trip_restores_side_files(native, tiny, tmp_path, run_cli):
    family = "InternVL2-2B"
    back = tmp_path / "back"
    assert run_cli("convert", native(family), "-o", back, "--to", "original").exit_code == 0
    for name in FILES:
        before, after = tiny(family) / name, back / name
        assert after.exists() == before.exists(), name
        if before.exists():
            assert after.read_bytes() == before.read_bytes(), name


# -- .venv-proc: AutoProcessor -> apply_chat_template -> processor -> generate ---------------

@pytest.fixture(scope="module")
def processor_runs(native, tmp_path_factory):
    """One .venv-proc process for every family: {family: its report}, pixel_values beside it."""
    work = tmp_path_factory.mktemp("proc-run")
    cases = []
    for i, family in enumerate(DIALECTS.values()):
        image = work / f"{family}.png"
        sample_image(20 + i, size=(120 + 30 * i, 80)).save(image)
        cases.append({"name": family, "native": str(native(family)), "image": str(image), "question": QUESTION,
                      "max_new_tokens": 12, "transpose": _original_config(native(family))["ps_version"] == "v1"})
    job, result = work / "job.json", work / "result.json"
    job.write_text(json.dumps({"cases": cases}))
    proc = subprocess.run([str(PROC_PYTHON), str(ROOT / "tests" / "processor_check.py"), str(job), str(result)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, _json(result)


@pytest.mark.skipif(not PROC_PYTHON.exists(), reason="the processor test needs .venv-proc (scripts/setup_processor.sh: "
                                                      "torch 2.14.1 + torchvision 0.29.1, which InternVLProcessor's image processor needs)")
@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_autoprocessor_generates_like_runtime(dialect, processor_runs, tiny):
    family = DIALECTS[dialect]
    work, results = processor_runs
    report = results[family]
    runtime = InternVLRuntime(tiny(family))
    from PIL import Image

    image = Image.open(work / f"{family}.png").convert("RGB")
    pixels = runtime.pixel_values(image)
    ids = runtime.prompt_ids(QUESTION, pixels.shape[0])[0].tolist()
    _, expected = runtime.generate(QUESTION, image, max_new_tokens=12)
    assert report["model_class"] == "InternVLForConditionalGeneration"
    std = min(IMAGENET_STD)
    for backend, image_processor, tolerance in (("pil", "GotOcr2ImageProcessorPil", 0.0),
                                                ("torchvision", "GotOcr2ImageProcessor", 2.5 / 255 / std)):
        run = report[backend]
        assert (run["processor"], run["image_processor"], run["image_seq_length"]) == ("InternVLProcessor", image_processor,
                                                                                       runtime.tokens_per_tile)
        assert run["input_ids"] == ids, backend  # same prompt text, same tiles, same token ids
        theirs = torch.load(work / f"{family}-{backend}.pt")
        assert theirs.shape == pixels.shape
        # the PIL backend is InternVL's preprocessing bit for bit; torchvision's bicubic rounds differently (<= 2 levels)
        assert (theirs - pixels).abs().max().item() <= tolerance + 1e-6, backend
        assert run["tokens"] == expected, backend
    if runtime.config["ps_version"] == "v1":  # vLLM's route: the image transposed before the processor
        # PIL's resize is exact on the transposed image; torchvision's rounds differently again (a few levels)
        for backend, tolerance in (("pil", 1e-6), ("torchvision", 6 / 255 / std)):
            pretransposed = torch.load(work / f"{family}-pretransposed-{backend}.pt")
            assert (pretransposed - pixels.transpose(-1, -2)).abs().max().item() <= tolerance, backend
            assert report[backend]["pretransposed_tokens"] == expected, backend
