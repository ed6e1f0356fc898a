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
    args = ["--method", "gptq", "--group-size", "32", "--num-samples", "3", "--seq-len", "48"]
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
    result = run_cli("quantize", native("InternVL2-2B"), "-o", out, "--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "32")
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
                                     ["quantize", "--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "32"]])
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


# -- int8 of an InternLM2 in either layout: the fused wqkv and its quantized side-tensors -------------------
INT8_FORMATS = ["bnb", "compressed-tensors", "w8a8"]


@pytest.fixture(scope="module")
def int8_of(tiny, native, tmp_path_factory):
    """int8_of(family, layout, fmt) -> `quantize --method int8 --format fmt` of the family's tiny checkpoint in that layout."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    cache = {}

    def get(family, layout, fmt):
        if (family, layout, fmt) not in cache:
            source = tiny(family) if layout == "original" else native(family)
            out = tmp_path_factory.mktemp("int8") / f"{family}-{layout}-{fmt}"
            result = CliRunner().invoke(cli, ["quantize", str(source), "-o", str(out), "--method", "int8", "--format", fmt])
            assert result.exit_code == 0, result.output
            cache[(family, layout, fmt)] = out
        return cache[(family, layout, fmt)]

    return get


@pytest.mark.parametrize("fmt", INT8_FORMATS)
@pytest.mark.parametrize("layout", ["original", "native"])
def test_int8_internlm2_in_either_layout_runs_every_command(layout, fmt, tiny, int8_of, tmp_path, run_cli):
    """make-tiny -> (convert --to hf) -> quantize int8 -> inspect / chat / verify / shard --gpus / convert: the native
    q/k/v_proj tensors and their per-tensor scalars (bnb weight_format, compressed-tensors weight_shape) merge back into
    InternLM2's wqkv as the format allows (it crashed: "shape '[2, 2, 16]' is invalid"), and converting the int8
    checkpoint gives the other layout's int8 checkpoint bit for bit, quantization_config included."""
    from internvl_tools.io.slices import write_tsv

    from .support import all_bytes, make_items

    family, other = "InternVL2-2B", "native" if layout == "original" else "original"
    quantized = int8_of(family, layout, fmt)
    report = run_cli("inspect", quantized, "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["params"] == summarize(tiny(family))["params"]
    image = tmp_path / "img.png"
    sample_image(3).save(image)
    answers = []
    for folder in (quantized, int8_of(family, other, fmt)):
        result = run_cli("chat", folder, "Describe the image.", "--image", image, "--max-new-tokens", "3", "--json", "--dtype", "fp32")
        assert result.exit_code == 0, result.output
        answers.append(json.loads(result.output)["token_ids"])
    assert answers[0] == answers[1]
    bench = write_tsv(make_items(2), tmp_path / "slice.tsv")
    result = run_cli("verify", tiny(family), quantized, "--bench", bench, "--max-new-tokens", "2", "--json", "-",
                     "--max-kl", "10", "--min-top1", "0", "--min-image-cosine", "0", "--max-acc-drop", "100")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["overall"]["n"] == 2
    planned = tmp_path / "2gpu"
    result = run_cli("shard", quantized, "-o", planned, "--gpus", "2", "--gpu-memory", "4GiB", "--reserve", "1GiB", "--context", "64")
    assert result.exit_code == 0, result.output
    assert set(json.loads((planned / "device_map.json").read_text()).values()) == {0, 1}
    assert all_bytes(planned) == all_bytes(quantized)
    converted = tmp_path / "converted"
    result = run_cli("convert", quantized, "-o", converted, "--to", "hf" if layout == "original" else "original")
    assert result.exit_code == 0, result.output
    assert all_bytes(converted) == all_bytes(int8_of(family, other, fmt))
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization_config"] == json.loads((int8_of(family, other, fmt) / "config.json").read_text())["quantization_config"]


def test_int8_internlm2_with_only_part_of_wqkv_quantized_is_refused(native, tmp_path, run_cli):
    """q_proj left in bf16 while k/v_proj are int8: wqkv cannot be one tensor; quantize refuses the selection
    in one line before writing (a reader refuses such a checkpoint made elsewhere the same way: models/views.py)."""
    out = tmp_path / "q"
    result = run_cli("quantize", native("InternVL2-2B"), "-o", out, "--method", "int8", "--skip", r"layers\.0\.self_attn\.q_proj")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "layers.0.attention.wqkv" in result.output and "together" in result.output
    assert not out.exists()


def test_gptq_internlm2_conversion_is_refused_naming_the_packed_tensor(tiny, tmp_path, run_cli):
    """GPTQ packs wqkv across its output rows: converting it is refused (convert first, then quantize)."""
    quantized, out = tmp_path / "q", tmp_path / "hf"
    assert run_cli("quantize", tiny("InternVL2-2B"), "-o", quantized, "--method", "gptq", "--group-size", "32", "--num-samples", "2",
                   "--seq-len", "32").exit_code == 0
    result = run_cli("convert", quantized, "-o", out)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "attention.wqkv.qweight" in result.output and "convert the bf16 checkpoint first" in result.output
    assert not out.exists()


# -- ps_version v1 without the sidecar ---------------------------------------------------------------------------------
def test_v1_native_without_sidecar_keeps_ps_version_v1(tiny, native, tmp_path, run_cli):
    """A V1 family converted to native and stripped of internvl_original.json: config.json's
    internvl_tools.source_ps_version keeps it v1, so the view undoes the v1 adaptation (bit for bit), the runtime's
    logits are the original's, and --to original writes ps_version v1 (it became v2: silently different images)."""
    family = "InternVL-Chat-V1-1"
    folder = native(family, sidecar=False)
    original = all_tensors(tiny(family))
    with open_view(folder) as view:
        assert view.config()["ps_version"] == "v1"
        assert set(view.keys()) == set(original) and all(torch.equal(view.get(k), original[k]) for k in view.keys())
    ours, theirs = InternVLRuntime(tiny(family), dtype=torch.float32), InternVLRuntime(folder, dtype=torch.float32)
    pixels = ours.pixel_values(sample_image(4))
    ids = ours.prompt_ids("What is it?", pixels.shape[0])
    assert torch.equal(ours.logits(ids, pixels), theirs.logits(ids, pixels))
    back = tmp_path / "back"
    assert run_cli("convert", folder, "-o", back, "--to", "original").exit_code == 0
    assert json.loads((back / "config.json").read_text())["ps_version"] == "v1"
    bad = tmp_path / "v3"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["internvl_tools"]["source_ps_version"] = "v3"
    (bad / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", bad)
    assert result.exit_code == 2 and "internvl_tools.source_ps_version is 'v3'" in result.output


# -- config files that disagree with the tensors, in the native layout ------------------------------------------------
def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("sidecar", [True, False])
def test_native_text_config_disagreeing_with_the_tensors_is_refused(sidecar, native, tmp_path, run_cli):
    """config.json's text_config is what transformers loads: checked against the tensors even with the sidecar."""
    folder = tmp_path / "n"
    shutil.copytree(native("InternVL2-2B", sidecar), folder)
    _edit_json(folder / "config.json", lambda c: c["text_config"].update(num_hidden_layers=5))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"{folder / 'config.json'}: text_config.num_hidden_layers is 5" in result.output


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s["config"]["llm_config"].update(num_hidden_layers=5), "llm_config.num_hidden_layers is 5"),
    (lambda s: s["config"]["llm_config"].update(hidden_size=128), "llm_config.hidden_size is 128"),
    (lambda s: s["config"]["llm_config"].update(num_attention_heads=8), "llm_config.num_attention_heads 8"),
])
def test_sidecar_disagreeing_with_the_tensors_is_refused_naming_it(edit, needle, native, tmp_path, run_cli):
    folder = tmp_path / "n"
    shutil.copytree(native("InternVL2-2B"), folder)
    _edit_json(folder / "internvl_original.json", edit)
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"{folder / 'internvl_original.json'}: {needle}" in result.output


def test_sidecar_of_another_model_is_refused_naming_it(native, tmp_path, run_cli):
    """InternVL2-26B's sidecar (InternViT-6B: no qkv bias) next to InternVL2-2B's tensors (InternViT-300M)."""
    folder = tmp_path / "n"
    shutil.copytree(native("InternVL2-2B"), folder)
    shutil.copy(native("InternVL2-26B") / "internvl_original.json", folder / "internvl_original.json")
    for command in (["inspect", folder], ["chat", folder, "hi", "--max-new-tokens", "1"]):
        result = run_cli(*command)
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert str(folder / "internvl_original.json") in result.output


def test_inspect_refuses_an_unknown_template_as_chat_does(tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    _edit_json(folder / "config.json", lambda c: c.update(template="my-own-template"))
    outputs = []
    for command in (["inspect", folder], ["chat", folder, "hi", "--max-new-tokens", "1"]):
        result = run_cli(*command)
        assert result.exit_code == 2
        outputs.append(result.output)
    assert outputs[0] == outputs[1] and "template 'my-own-template'" in outputs[0]


def test_native_inspect_tensor_count_adds_up(native, run_cli):
    """`tensors` counts the stored tensors, and so do the per-dtype counts (they counted the merged original keys)."""
    report = json.loads(run_cli("inspect", native("InternVL2-2B"), "--json").output)
    assert report["tensors"] == sum(d["tensors"] for d in report["dtypes"].values()) == len(all_tensors(native("InternVL2-2B")))
    assert report["bytes"]["total"] == sum(d["bytes"] for d in report["dtypes"].values())


@pytest.mark.parametrize("fmt", INT8_FORMATS)
def test_int8_of_the_original_comes_back_from_the_native_layout(fmt, tiny, int8_of, tmp_path, run_cli):
    """quantize (original) -> convert --to hf -> convert --to original gives the int8 checkpoint back bit for bit, its
    quantization_config included (the sidecar's original-named config was read as native names: bnb lost vision_model /
    mlp1 from llm_int8_skip_modules, compressed-tensors the towers' ignore rules)."""
    from .support import all_bytes

    quantized, hf, back = int8_of("InternVL2-1B", "original", fmt), tmp_path / "hf", tmp_path / "back"
    assert run_cli("convert", quantized, "-o", hf).exit_code == 0
    assert run_cli("convert", hf, "-o", back, "--to", "original").exit_code == 0
    assert json.loads((back / "config.json").read_text()) == json.loads((quantized / "config.json").read_text())
    assert all_bytes(back) == all_bytes(quantized)


def test_sidecar_from_another_model_is_refused(native, tmp_path, run_cli):
    """An internvl_original.json copied from another model of the same widths (InternLM2's into a
    Qwen2 folder; a Qwen2 one missing the q_proj biases) is refused naming the file, not read as
    the wrong family or converted into a wrong checkpoint."""
    folder = tmp_path / "q2"
    shutil.copytree(native("InternVL2-1B"), folder)
    shutil.copy(native("InternVL2-2B") / "internvl_original.json", folder / "internvl_original.json")
    for command in (("inspect", folder), ("convert", folder, "-o", tmp_path / "back", "--to", "original")):
        result = run_cli(*command)
        assert result.exit_code == 2 and "internvl_original.json" in result.output and "qwen2" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "back").exists()
    shutil.copy(native("InternVL2-1B") / "internvl_original.json", folder / "internvl_original.json")
    saved = json.loads((folder / "internvl_original.json").read_text())
    saved["keys"] = [k for k in saved["keys"] if not k.endswith("q_proj.bias")]
    (folder / "internvl_original.json").write_text(json.dumps(saved))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "internvl_original.json" in result.output and "q_proj.bias" in result.output


@pytest.mark.parametrize("sidecar", [True, False])
@pytest.mark.parametrize("field, value", [("downsample_ratio", 0.25), ("vision_feature_layer", 7), ("image_token_id", 10 ** 6),
                                          ("head_dim", None)])
def test_native_config_fields_that_disagree_with_the_tensors_are_refused(field, value, sidecar, native, tmp_path, run_cli):
    """downsample_ratio vs mlp1's input width, vision_feature_layer beyond the vision layers,
    image_token_id outside the vocabulary, Qwen3 head_dim vs q_norm (heads doubled so q/k/v rows
    still fit): one line naming config.json and the field."""
    folder = tmp_path / "bad"
    shutil.copytree(native("InternVL3.5-1B", sidecar=sidecar), folder)
    config = json.loads((folder / "config.json").read_text())
    if field == "head_dim":
        text = config["text_config"]
        text["num_attention_heads"] *= 2
        text["num_key_value_heads"] *= 2
        text["head_dim"] //= 2
    else:
        config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "config.json" in result.output and field in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value", [("downsample_ratio", 0.25), ("select_layer", -5), ("max_dynamic_patch", 0)])
def test_original_config_fields_that_disagree_with_the_tensors_are_refused(field, value, tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "config.json" in result.output and field in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("field", ["template", "architectures"])
def test_sidecar_template_and_architecture_errors_name_the_sidecar(field, native, tmp_path, run_cli):
    folder = tmp_path / "s"
    shutil.copytree(native("InternVL2-1B"), folder)
    saved = json.loads((folder / "internvl_original.json").read_text())
    if field == "template":
        saved["config"]["template"] = "nope"
    else:
        saved["config"]["llm_config"]["architectures"] = ["FooForCausalLM"]
    (folder / "internvl_original.json").write_text(json.dumps(saved))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "internvl_original.json" in result.output and "config.json" not in result.output
