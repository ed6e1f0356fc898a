"""`quantize --method int8`: bitsandbytes' bytes, kept modules untouched, loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.io.reader import CheckpointReader
from internvl_tools.formats.bnb_int8 import quantize_rowwise

from .conftest import ALL_FAMILIES
from .support import all_tensors, sample_image


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    cache = {}

    def get(family, source=None):
        key = (family, source)
        if key not in cache:
            from click.testing import CliRunner

            from internvl_tools.cli.main import cli

            out = tmp_path_factory.mktemp("int8") / family
            result = CliRunner().invoke(cli, ["quantize", str(source or tiny(family)), "-o", str(out), "--method", "int8",
                                              "--max-shard-size", "100KB", "--json"])
            assert result.exit_code == 0, result.output
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.requires("bitsandbytes")
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_int8_bytes_equal_bitsandbytes_and_rest_untouched(family, tiny, quantized):
    import bitsandbytes.functional as bnb_functional

    src, out = all_tensors(tiny(family)), all_tensors(quantized(family))
    config = json.loads((quantized(family) / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True
    assert "quantization_config" not in config["llm_config"]
    assert {"vision_model", "mlp1"} <= set(qc["llm_int8_skip_modules"])
    head = "language_model.output" if "internlm2" in config["llm_config"]["model_type"] else "language_model.lm_head"
    assert head in qc["llm_int8_skip_modules"]
    quantized_keys = {k.removesuffix(".SCB") + ".weight" for k in out if k.endswith(".SCB")}
    expected = {k for k, t in src.items() if k.startswith("language_model.model.layers.") and t.dim() == 2}
    assert quantized_keys == expected and expected
    for key in expected:
        cb, scb, _ = bnb_functional.int8_vectorwise_quant(src[key].to(torch.float16))
        assert out[key].dtype == torch.int8 and torch.equal(out[key], cb), key
        assert torch.equal(out[key.removesuffix(".weight") + ".SCB"], scb), key
        assert out[key.removesuffix(".weight") + ".weight_format"].item() == 0
    for key, tensor in src.items():
        if key not in expected:
            assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key


@pytest.mark.requires("bitsandbytes")
def test_quantize_rowwise_matches_bitsandbytes_on_awkward_rows():
    import bitsandbytes.functional as bnb_functional

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(300, 257, generator=g) * 3).to(torch.bfloat16)
    w[7] = 0
    w[9, 3] = 60000  # near the float16 limit
    cb, scb, _ = bnb_functional.int8_vectorwise_quant(w.to(torch.float16))
    q, s = quantize_rowwise(w, row_block=64)
    assert torch.equal(q, cb) and torch.equal(s, scb)


@pytest.mark.requires("bitsandbytes", "accelerate")
@pytest.mark.parametrize("family", ["InternVL2-2B", "InternVL2-1B", "InternVL2-4B", "InternVL2-Llama3-76B"])
def test_native_int8_loads_in_transformers(family, tiny, tmp_path, quantized, run_cli):
    """make-tiny -> convert --to hf -> quantize: from_pretrained with no extra arguments on CPU."""
    from bitsandbytes.nn import Linear8bitLt
    from transformers import AutoModelForImageTextToText

    native = tmp_path / "hf"
    assert run_cli("convert", tiny(family), "-o", native).exit_code == 0
    out = quantized(family, native)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, Linear8bitLt)
    assert not isinstance(model.model.vision_tower.encoder.layer[0].attention.q_proj, Linear8bitLt)
    assert not isinstance(model.lm_head, Linear8bitLt) and not isinstance(model.model.multi_modal_projector.linear_1, Linear8bitLt)
    reference = AutoModelForImageTextToText.from_pretrained(native)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    relative = (got - want).norm() / want.norm()
    assert relative < 0.05, relative
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
    # vision tower tensors are bit-identical to the input
    src, dst = all_tensors(native), all_tensors(out)
    for key in src:
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            assert torch.equal(src[key], dst[key])


def test_runtime_runs_int8_checkpoint(tiny, quantized):
    from internvl_tools.runtime.model import InternVLRuntime

    bf16, int8 = InternVLRuntime(tiny("InternVL2-8B")), InternVLRuntime(quantized("InternVL2-8B"))
    pixels = bf16.pixel_values(sample_image(5))
    ids = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    want, got = bf16.logits(ids, pixels), int8.logits(ids, pixels)
    assert torch.equal(int8.image_features(pixels), bf16.image_features(pixels))  # vision untouched
    assert (got - want).norm() / want.norm() < 0.03


def test_skip_and_only(tiny, tmp_path, run_cli):
    src = tiny("InternVL2-1B")
    out = tmp_path / "o"
    result = run_cli("quantize", src, "-o", out, "--method", "int8", "--skip", r"layers\.0\.", "--skip", "down_proj", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    with CheckpointReader(out) as reader:
        scb = [k for k in reader.keys() if k.endswith(".SCB")]
    assert scb and not any("layers.0." in k or "down_proj" in k for k in scb)
    assert "language_model.model.layers.0.self_attn.q_proj" in summary["skip_modules"]
    only = run_cli("quantize", src, "-o", tmp_path / "v", "--method", "int8", "--only", r"vision_model.*mlp\.fc1", "--json")
    assert only.exit_code == 0, only.output
    with CheckpointReader(tmp_path / "v") as reader:
        scb = [k for k in reader.keys() if k.endswith(".SCB")]
    assert scb and all("vision_model" in k and "fc1" in k for k in scb)


def test_bad_input_exits_2(tiny, tmp_path, quantized, run_cli):
    again = run_cli("quantize", quantized("InternVL2-1B"), "-o", tmp_path / "a", "--method", "int8")
    assert again.exit_code == 2 and "already quantized" in again.output
    unknown = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "b", "--method", "int3")
    assert unknown.exit_code == 2
    lora = run_cli("quantize", tiny("InternVL2-1B", lora="embedded"), "-o", tmp_path / "c", "--method", "int8")
    assert lora.exit_code == 2 and "merge-lora" in lora.output
    nothing = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "d", "--method", "int8", "--only", "no-such-key")
    assert nothing.exit_code == 2 and "nothing to quantize" in nothing.output
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_shard_plans_real_int8_sizes(tiny, quantized, run_cli):
    """Planning reads the quantized checkpoint's real sizes."""
    bf16 = json.loads(run_cli("inspect", tiny("InternVL2-40B"), "--json").output)
    int8 = json.loads(run_cli("inspect", quantized("InternVL2-40B"), "--json").output)
    assert int8["quantization"]["quant_method"] == "bitsandbytes"
    assert sum(int8["llm_layer_bytes"]) < 0.6 * sum(bf16["llm_layer_bytes"])
    plan = json.loads(run_cli("shard", quantized("InternVL2-40B"), "--gpus", "2", "--gpu-memory", "600KB", "--reserve", "1KB",
                              "--context", "4", "--plan-only", "--json").output)
    layer_bytes = sum(g["weight_bytes"] for g in plan["gpu_plan"]["gpus"])
    assert layer_bytes == int8["bytes"]["total"]


@pytest.mark.requires("compressed_tensors")
@pytest.mark.parametrize("family", ["InternVL2-2B", "InternVL2-Llama3-76B"])
def test_compressed_tensors_w8a16_loads_in_transformers(family, tiny, tmp_path, run_cli):
    """--format compressed-tensors: vLLM's pack-quantized W8A16; the compressed-tensors package
    decompresses it in transformers to q x scale of our own quantization."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from transformers import AutoModelForImageTextToText

    from internvl_tools.formats.compressed_tensors import quantize_symmetric_channel

    native, out = tmp_path / "hf", tmp_path / "ct"
    assert run_cli("convert", tiny(family), "-o", native).exit_code == 0
    result = run_cli("quantize", native, "-o", out, "--method", "int8", "--format", "compressed-tensors")
    assert result.exit_code == 0, result.output
    src, dst = all_tensors(native), all_tensors(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    key = "model.language_model.layers.1.mlp.down_proj"
    q, scale = quantize_symmetric_channel(src[key + ".weight"])
    assert torch.equal(dst[key + ".weight_packed"], pack_to_int32(q, 8))
    assert torch.equal(dst[key + ".weight_scale"], scale) and dst[key + ".weight_shape"].tolist() == list(q.shape)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = AutoModelForImageTextToText.from_pretrained(native)
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():  # the first forward decompresses the weights
        got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    assert (got - want).norm() / want.norm() < 0.02
    loaded = model.model.language_model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(loaded.float(), (q.float() * scale.float()).to(loaded.dtype).float(), rtol=0, atol=0)
    assert torch.equal(model.model.vision_tower.encoder.layer[0].attention.q_proj.weight, src["model.vision_tower.encoder.layer.0.attention.q_proj.weight"])


@pytest.mark.parametrize("family", ["InternVL2-2B", "InternVL2-1B"])
def test_part_of_fused_linear_refused_in_native_layout(family, tiny, tmp_path, run_cli):
    """--skip q_proj alone of a converted InternLM2 (wqkv) or --only of the vision q_proj (InternViT
    attn.qkv) would leave a checkpoint no command reads: refused before writing, in one line."""
    native = tmp_path / "hf"
    assert run_cli("convert", tiny(family), "-o", native, "--to", "hf").exit_code == 0
    pattern = ("--skip", "q_proj") if family == "InternVL2-2B" else ("--only", r"vision_tower.*\.q_proj")
    result = run_cli("quantize", native, "-o", tmp_path / "q", "--method", "int8", *pattern)
    assert result.exit_code == 2 and "fused" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()
    whole = run_cli("quantize", native, "-o", tmp_path / "w", "--method", "int8", "--skip", "(q|k|v)_proj")
    assert whole.exit_code == 0, whole.output
