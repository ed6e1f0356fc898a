"""Both layouts everywhere: every command reads the original and the transformers-native layout
(with or without internvl_original.json) and writes the layout it was given."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from internvl_tools.evaluate.inspect import summarize
from internvl_tools.models.views import NativeView, open_view
from internvl_tools.runtime.model import InternVLRuntime

from .support import all_tensors, sample_image

FAMILIES = ["InternVL2-1B", "InternVL2-2B", "InternVL-Chat-V1-2"]


@pytest.fixture(scope="module")
def native(tiny, tmp_path_factory):
    """native(family, sidecar=True) -> a `convert --to hf` output (sidecar=False: as a published -hf one)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    cache = {}

    def get(family, sidecar=True):
        if (family, sidecar) not in cache:
            out = tmp_path_factory.mktemp("native") / f"{family}-{sidecar}"
            result = CliRunner().invoke(cli, ["convert", str(tiny(family)), "-o", str(out)])
            assert result.exit_code == 0, result.output
            if not sidecar:
                (out / "internvl_original.json").unlink()
            cache[(family, sidecar)] = out
        return cache[(family, sidecar)]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_native_view_is_the_original_checkpoint(family, tiny, native):
    """Through the view, a converted checkpoint has the original keys and tensors, bit for bit."""
    original = all_tensors(tiny(family))
    with open_view(native(family)) as view:
        assert isinstance(view, NativeView) and view.layout_name == "native"
        assert set(view.keys()) == set(original)
        for key in view.keys():
            assert torch.equal(view.get(key), original[key]), key


def test_native_view_without_sidecar_derives_the_original_config(tiny, native):
    """A published -hf checkpoint (no internvl_original.json): config derived, keys mapped back."""
    with open_view(native("InternVL2-1B", sidecar=False)) as view, open_view(tiny("InternVL2-1B")) as reference:
        config, ref = view.config(), reference.config()
        assert config["model_type"] == "internvl_chat" and config["template"] == "internvl2_5"
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "norm_type", "qkv_bias",
                      "qk_normalization", "patch_size", "image_size"):
            assert config["vision_config"][field] == ref["vision_config"][field], field
        for field in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "rope_theta"):
            assert config["llm_config"][field] == ref["llm_config"][field], field
        assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
        assert set(view.keys()) == set(reference.keys())
        assert all(torch.equal(view.get(k), reference.get(k)) for k in view.keys())


@pytest.mark.parametrize("sidecar", [True, False])
@pytest.mark.parametrize("family", ["InternVL2-1B", "InternVL2-2B"])
def test_inspect_reports_the_same_model_in_either_layout(family, sidecar, tiny, native):
    ours, theirs = summarize(tiny(family)), summarize(native(family, sidecar))
    assert theirs["layout"] == "native" and ours["layout"] == "original"
    assert theirs["params"] == ours["params"]
    assert theirs["llm"]["layers"] == ours["llm"]["layers"] and theirs["vision"]["layers"] == ours["vision"]["layers"]


def test_readme_recipe_convert_int8_shard_gpus(tiny, tmp_path, run_cli):
    """convert -> quantize --method int8 -> shard --gpus 2: device_map.json names native modules
    and transformers places every tensor with it."""
    from transformers import AutoModelForImageTextToText

    hf, int8, planned = tmp_path / "hf", tmp_path / "int8", tmp_path / "2gpu"
    assert run_cli("convert", tiny("InternVL2-1B"), "-o", hf).exit_code == 0
    result = run_cli("quantize", hf, "-o", int8, "--method", "int8")
    assert result.exit_code == 0, result.output
    result = run_cli("shard", int8, "-o", planned, "--gpus", "2", "--gpu-memory", "4GiB", "--reserve", "1GiB", "--context", "64")
    assert result.exit_code == 0, result.output
    device_map = json.loads((planned / "device_map.json").read_text())
    assert set(device_map.values()) == {0, 1}
    assert {"model.vision_tower", "model.multi_modal_projector", "lm_head", "model.language_model.embed_tokens"} <= set(device_map)
    # the same plan on the bf16 native checkpoint, loaded by transformers with the map (CPU stands in for the GPUs)
    planned_bf16 = tmp_path / "2gpu-bf16"
    assert run_cli("shard", hf, "-o", planned_bf16, "--gpus", "2", "--gpu-memory", "4GiB", "--reserve", "1GiB",
                   "--context", "64").exit_code == 0
    bf16_map = json.loads((planned_bf16 / "device_map.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(planned_bf16, device_map={k: "cpu" for k in bf16_map})
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    # shard files never mix GPUs: every file's keys belong to one GPU's modules
    index = json.loads((planned_bf16 / "model.safetensors.index.json").read_text())["weight_map"]
    owner = {}
    for key, filename in index.items():
        module = max((m for m in bf16_map if key.startswith(m + ".")), key=len)
        owner.setdefault(filename, set()).add(bf16_map[module])
    assert all(len(gpus) == 1 for gpus in owner.values())


def test_int8_then_convert_then_chat(tiny, tmp_path, run_cli):
    """make-tiny -> quantize int8 -> convert --to hf -> chat gives the tokens of the int8 original
    (it ended in AttributeError 'OriginalView' object has no attribute 'close')."""
    int8, hf = tmp_path / "int8", tmp_path / "int8-hf"
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", int8, "--method", "int8").exit_code == 0
    assert run_cli("convert", int8, "-o", hf).exit_code == 0
    image = tmp_path / "img.png"
    sample_image(2).save(image)
    answers = []
    for folder in (int8, hf):
        result = run_cli("chat", folder, "Describe the image.", "--image", image, "--max-new-tokens", "4", "--json", "--dtype", "fp32")
        assert result.exit_code == 0, result.output
        answers.append(json.loads(result.output)["token_ids"])
    assert answers[0] == answers[1]


def test_int8_of_native_equals_native_of_int8(tiny, native, tmp_path, run_cli):
    """quantize works in the layout it is given: int8(convert(x)) has the tensors of convert(int8(x))."""
    a, b, b_hf = tmp_path / "a", tmp_path / "b", tmp_path / "b-hf"
    assert run_cli("quantize", native("InternVL2-1B"), "-o", a, "--method", "int8").exit_code == 0
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", b, "--method", "int8").exit_code == 0
    assert run_cli("convert", b, "-o", b_hf).exit_code == 0
    left, right = all_tensors(a), all_tensors(b_hf)
    assert set(left) == set(right)
    assert all(torch.equal(left[k], right[k]) for k in left)
    assert json.loads((a / "config.json").read_text())["model_type"] == "internvl"


def test_merge_lora_on_the_native_layout(tiny, tmp_path, run_cli):
    """A PEFT adapter merged into a native checkpoint equals the converted merge of the original."""
    from internvl_tools.tiny.generator import make_checkpoint, make_peft_adapter

    base = make_checkpoint("InternVL2-1B", tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "adapter")
    hf, merged_hf, merged, merged_then_hf = (tmp_path / n for n in ("hf", "m-hf", "m", "m-then-hf"))
    assert run_cli("convert", base, "-o", hf).exit_code == 0
    assert run_cli("merge-lora", hf, "-o", merged_hf, "--adapter", adapter).exit_code == 0
    assert run_cli("merge-lora", base, "-o", merged, "--adapter", adapter).exit_code == 0
    assert run_cli("convert", merged, "-o", merged_then_hf).exit_code == 0
    left, right = all_tensors(merged_hf), all_tensors(merged_then_hf)
    assert set(left) == set(right) and all(torch.equal(left[k], right[k]) for k in left)


def test_convert_back_without_sidecar_runs(native, tmp_path, run_cli):
    """A published -hf checkpoint converts to the original layout, which the runtime runs."""
    out = tmp_path / "orig"
    result = run_cli("convert", native("InternVL2-2B", sidecar=False), "-o", out, "--to", "original")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["llm_config"]["architectures"] == ["LlamaForCausalLM"]
    ours = InternVLRuntime(out, dtype=torch.float32)
    theirs = InternVLRuntime(native("InternVL2-2B", sidecar=False), dtype=torch.float32)
    pixels = ours.pixel_values(sample_image(1))
    ids = ours.prompt_ids("What is it?", pixels.shape[0])
    assert torch.allclose(ours.logits(ids, pixels), theirs.logits(ids, pixels), atol=1e-5)


def test_unknown_template_is_an_error(tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    config["template"] = "my-own-template"
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("chat", folder, "hi", "--max-new-tokens", "2")
    assert result.exit_code == 2
    assert "template 'my-own-template'" in result.output and "internvl2_5" in result.output and "Hermes-2" in result.output


def test_native_checkpoint_with_a_stray_key_is_refused(native, tmp_path, run_cli):
    """Every key of a native checkpoint must map to the layout: nothing is silently dropped."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "stray"
    shutil.copytree(native("InternVL2-1B", sidecar=False), folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.language_model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, str(shard))
    if (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.language_model.layers.0.mlp.extra_proj.weight"] = shard.name
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "extra_proj" in result.output


def test_gptq_in_the_native_layout_equals_the_converted_original_gptq(tiny, native, tmp_path, run_cli):
    """The calibrated pipeline reads a native checkpoint and writes the native layout: bit for bit
    what converting the original's GPTQ output gives, with the same config rules."""
    args = ["--method", "gptq", "--num-samples", "3", "--seq-len", "48"]
    a, b, b_hf = tmp_path / "a", tmp_path / "b", tmp_path / "b-hf"
    assert run_cli("quantize", native("InternVL2-1B"), "-o", a, *args).exit_code == 0
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", b, *args).exit_code == 0
    assert run_cli("convert", b, "-o", b_hf).exit_code == 0
    left, right = all_tensors(a), all_tensors(b_hf)
    assert set(left) == set(right) and all(torch.equal(left[k], right[k]) for k in left)
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert config["quantization_config"] == json.loads((b_hf / "config.json").read_text())["quantization_config"]


def test_gptq_of_a_converted_internlm2_quantizes_the_llama_it_became(native, tmp_path, run_cli):
    out = tmp_path / "q"
    result = run_cli("quantize", native("InternVL2-2B"), "-o", out, "--method", "gptq", "--num-samples", "2", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    keys = set(all_tensors(out))
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in keys and not any("wqkv" in k for k in keys)
    runtime = InternVLRuntime(out, dtype=torch.float32)
    text, ids = runtime.generate("Hello", max_new_tokens=2)
    assert len(ids) >= 1


def test_round_trip_restores_the_remote_code_files(tiny, copy_of, tmp_path, run_cli):
    """convert --to hf drops the remote-code *.py (the native class needs none) and --to original
    brings them back, byte for byte, so the original loads with its own code again."""
    folder = copy_of(tiny("InternVL2-1B"))
    code = {"configuration_internvl_chat.py": "# config code\nX = 1\n", "modeling_internvl_chat.py": "# model code\nY = 2\n"}
    for name, text in code.items():
        (folder / name).write_text(text)
    hf, int8, back = tmp_path / "hf", tmp_path / "int8", tmp_path / "back"
    assert run_cli("convert", folder, "-o", hf).exit_code == 0
    assert not list(hf.glob("*.py"))
    assert run_cli("quantize", hf, "-o", int8, "--method", "int8").exit_code == 0  # the sidecar travels with outputs
    assert run_cli("convert", hf, "-o", back, "--to", "original").exit_code == 0
    assert {p.name: p.read_text() for p in back.glob("*.py")} == code
    sidecar = json.loads((int8 / "internvl_original.json").read_text())
    assert sidecar["remote_code"] == code


@pytest.mark.parametrize("command", [["shard"], ["quantize", "--method", "int8"], ["convert"],
                                     ["quantize", "--method", "gptq", "--num-samples", "2", "--seq-len", "32"]])
def test_a_stale_lora_flag_is_corrected_in_every_output(command, tiny, copy_of, tmp_path, run_cli):
    """use_llm_lora set on an already merged checkpoint makes the remote code wrap the LLM in
    uninitialised LoRA (InternVL#231, #468): every output corrects it, with a warning."""
    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, use_llm_lora=16)))
    out = tmp_path / "out"
    result = run_cli(command[0], folder, "-o", out, *command[1:])
    assert result.exit_code == 0, result.output
    assert "use_llm_lora: 16 but there are no LoRA tensors" in result.output
    written = json.loads((out / "config.json").read_text())
    if written.get("model_type") == "internvl":
        written = json.loads((out / "internvl_original.json").read_text())["config"]
    assert written["use_llm_lora"] == 0
