"""`convert --to hf` loads in transformers without remote code and matches the runtime;
`--to original` restores the checkpoint bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.runtime.model import InternVLRuntime

from .conftest import ALL_FAMILIES, DIALECT_FAMILIES, NEW_DIALECTS
from .support import all_bytes, sample_image


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            from click.testing import CliRunner

            from internvl_tools.cli.main import cli

            out = tmp_path_factory.mktemp("hf") / family
            result = CliRunner().invoke(cli, ["convert", str(tiny(family)), "-o", str(out), "--max-shard-size", "100KB"])
            assert result.exit_code == 0, result.output
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize("family", DIALECT_FAMILIES)
def test_round_trip_bit_identical(family, tiny, converted, tmp_path, run_cli):
    back = tmp_path / "back"
    result = run_cli("convert", converted(family), "-o", back, "--to", "original")
    assert result.exit_code == 0, result.output
    assert all_bytes(back) == all_bytes(tiny(family))
    assert json.loads((back / "config.json").read_text()) == json.loads((tiny(family) / "config.json").read_text())
    assert not (back / "internvl_original.json").exists()


# every seed family, one per new dialect, InternVL3-9B (InternLM2 keys with 2 KV heads and dynamic RoPE scaling) and
# InternVL2.5-1B (qwen2 with the internvl2_5 template, pixel shuffle v2 and 12 tiles + thumbnail)
@pytest.mark.parametrize("family", ALL_FAMILIES + NEW_DIALECTS + ["InternVL3-9B", "InternVL2.5-1B"])
def test_native_model_matches_runtime(family, tiny, converted):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(converted(family), dtype=torch.float32, attn_implementation="eager",
                                                              output_loading_info=True)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    runtime = InternVLRuntime(tiny(family))
    pixels = runtime.pixel_values(sample_image(2))
    input_ids = runtime.prompt_ids("Describe the image in detail.", pixels.shape[0])
    native_pixels = pixels.transpose(-1, -2) if runtime.config["ps_version"] == "v1" else pixels
    with torch.no_grad():
        native = model(input_ids=input_ids, pixel_values=native_pixels).logits
    torch.testing.assert_close(native, runtime.logits(input_ids, pixels), rtol=1e-4, atol=1e-4)
    stop = runtime.tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in runtime.tokenizer.get_vocab() else runtime.tokenizer.eos_token_id
    generated = model.generate(input_ids=input_ids, pixel_values=native_pixels, max_new_tokens=8, do_sample=False,
                               eos_token_id=stop, pad_token_id=stop)[0, input_ids.shape[1]:].tolist()
    _, ours = runtime.generate("Describe the image in detail.", sample_image(2), max_new_tokens=8)
    assert generated == ours


def test_native_config_fields(tiny, converted):
    config = json.loads((converted("InternVL2-Llama3-76B") / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["vision_config"]["norm_type"] == "rms_norm" and config["vision_config"]["use_qk_norm"] is True
    assert config["vision_config"]["use_mean_pooling"] is True and config["tie_word_embeddings"] is False
    assert config["vision_feature_select_strategy"] == "default"
    from transformers import AutoTokenizer

    assert config["image_token_id"] == AutoTokenizer.from_pretrained(tiny("InternVL2-Llama3-76B")).convert_tokens_to_ids("<IMG_CONTEXT>")
    internlm = json.loads((converted("InternVL2-26B") / "config.json").read_text())
    assert internlm["text_config"]["model_type"] == "llama"
    v1 = json.loads((converted("InternVL-Chat-V1-2") / "config.json").read_text())
    assert v1["internvl_tools"]["source_ps_version"] == "v1"


def test_convert_refuses_bad_input(tiny, tmp_path, run_cli, converted):
    lora = run_cli("convert", tiny("InternVL2-1B", lora="embedded"), "-o", tmp_path / "a")
    assert lora.exit_code == 2 and "merge-lora" in lora.output and str(tiny("InternVL2-1B", lora="embedded")) in lora.output
    back = run_cli("convert", tiny("InternVL2-1B"), "-o", tmp_path / "b", "--to", "original")
    assert back.exit_code == 2 and "internvl_original.json" in back.output
    twice = run_cli("convert", converted("InternVL2-1B"), "-o", tmp_path / "c")
    assert twice.exit_code == 2 and "native" in twice.output


def test_chat_cli(tiny, tmp_path, run_cli):
    image = tmp_path / "img.png"
    sample_image(3).save(image)
    result = run_cli("chat", tiny("InternVL2-4B"), "What is in the image?", "--image", image, "--dtype", "fp32",
                     "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    _, ids = InternVLRuntime(tiny("InternVL2-4B")).generate("What is in the image?", sample_image(3), max_new_tokens=5)
    assert answer["token_ids"] == ids
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert run_cli("chat", tiny("InternVL2-4B"), "hi", "--image", bad).exit_code == 2


@pytest.mark.parametrize("family", ["InternVL-Chat-V1-2", "InternVL2-2B", "InternVL2-4B"])
def test_runtime_reads_converted_checkpoints(family, tiny, converted):
    """chat / verify run a `convert --to hf` output exactly like its original."""
    original, native = InternVLRuntime(tiny(family)), InternVLRuntime(converted(family))
    pixels = original.pixel_values(sample_image(9))
    ids = original.prompt_ids("Describe the image.", pixels.shape[0])
    assert torch.equal(native.image_features(pixels), original.image_features(pixels))
    assert torch.equal(native.logits(ids, pixels), original.logits(ids, pixels))
