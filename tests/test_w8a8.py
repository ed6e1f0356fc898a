"""`quantize --method int8 --format w8a8`: compressed-tensors int-quantized W8A8 (int8 weights per
channel, int8 activations per token, dynamic) — the codes of the bitsandbytes path, read back by
the compressed-tensors package and by transformers, run by our runtime."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.formats import compressed_tensors, detect
from internvl_tools.formats.dequantized import DequantizedView
from internvl_tools.models.views import open_view

from .support import all_tensors, sample_image

FAMILIES = ["InternVL2-1B", "InternVL2-2B", "InternVL2-4B"]  # qwen2, internlm2 (fused wqkv), phi3 (fused qkv / gate_up)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """quantized(family, fmt, source=None) -> folder written by `quantize --method int8 --format fmt`."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    cache = {}

    def get(family, fmt="w8a8", source=None):
        key = (family, fmt, source)
        if key not in cache:
            out = tmp_path_factory.mktemp("w8a8") / f"{family}-{fmt}"
            args = ["quantize", str(source or tiny(family)), "-o", str(out), "--method", "int8", "--format", fmt, "--json"]
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
            cache[key] = out
        return cache[key]

    return get


def _scheme(quant: dict):
    """compressed-tensors' own parse of our config: its QuantizationConfig and group_0's scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(quant)
    return parsed, parsed.config_groups["group_0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_config_and_codes_equal_the_bnb_path(family, tiny, quantized):
    src, out, bnb = all_tensors(tiny(family)), all_tensors(quantized(family)), all_tensors(quantized(family, "bnb"))
    config = json.loads((quantized(family) / "config.json").read_text())
    qc = config["quantization_config"]
    assert "quantization_config" not in config["llm_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["symmetric"] and group["weights"]["strategy"] == "channel"
    acts = group["input_activations"]
    assert acts["num_bits"] == 8 and acts["dynamic"] is True and acts["strategy"] == "token" and acts["symmetric"]
    assert qc["ignore"][:2] == ["re:.*vision_model.*", "re:.*mlp1.*"]
    head = "language_model.output" if "internlm2" in config["llm_config"]["model_type"] else "language_model.lm_head"
    assert head in qc["ignore"]
    assert detect(config).name == "compressed_tensors_int8"
    expected = {k for k, t in src.items() if k.startswith("language_model.model.layers.") and t.dim() == 2}
    assert {k.removesuffix("_scale") for k in out if k.endswith(".weight_scale")} == expected and expected
    for key in expected:
        scale = out[key + "_scale"]
        assert out[key].dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (src[key].shape[0], 1)
        assert torch.equal(out[key], bnb[key]), key  # the same codes as bitsandbytes' LLM.int8()
        assert torch.equal(scale[:, 0], bnb[key.removesuffix(".weight") + ".SCB"] / 127), key
    for key, tensor in src.items():
        if key not in expected:
            assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key


def test_w8a8_codes_on_awkward_rows():
    """All-zero rows, a bf16 weight beyond float16 (bitsandbytes' fp16 cast overflows there; we don't)."""
    w = (torch.randn(70, 33, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    w[4] = 0
    w[6, 2] = 1e6
    got = compressed_tensors.quantize_w8a8(w, row_block=16)
    assert torch.equal(got["weight"][4], torch.zeros(33, dtype=torch.int8)) and got["weight_scale"][4].item() == 0
    assert got["weight"][6, 2] == 127 and got["weight"].abs().max() <= 127
    restored = compressed_tensors.dequantize_int(got, {})
    assert ((restored - w.float()).abs() <= got["weight_scale"] / 2 + 1e-6).all()
    meta = compressed_tensors.quantize_w8a8(torch.empty(5, 7, device="meta"))
    assert meta["weight"].shape == (5, 7) and meta["weight_scale"].shape == (5, 1)


@pytest.mark.requires("compressed_tensors")
def test_compressed_tensors_reads_and_writes_the_same_tensors(tiny, quantized):
    """The package's IntQuantizationCompressor decompresses our tensors to our dequantized weights,
    and compresses the float weight with our scale to our codes (its own quantize math)."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    folder = quantized("InternVL2-1B")
    parsed, scheme = _scheme(json.loads((folder / "config.json").read_text())["quantization_config"])
    assert parsed.format == "int-quantized" and scheme.input_activations.dynamic is True
    src, out = all_tensors(tiny("InternVL2-1B")), all_tensors(folder)
    with DequantizedView(open_view(folder)) as view:
        assert not [k for k in view.keys() if k.endswith("weight_scale")]
        for key in ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.1.mlp.down_proj.weight"):
            stored = {"weight": out[key], "weight_scale": out[key + "_scale"]}
            theirs = IntQuantizationCompressor.decompress(stored, scheme)["weight"]
            assert view.spec(key).dtype == "F32" and view.spec(key).shape == src[key].shape
            assert torch.equal(view.get(key), theirs.float()), key
            recompressed = IntQuantizationCompressor.compress({"weight": src[key].float(), "weight_scale": out[key + "_scale"]}, scheme)
            # equal but at exact ties (w = scale x (k + 1/2)): they divide by the scale, bnb (and we)
            # multiply by 127 / absmax, and the float32 results fall on either side of .5
            differ = recompressed["weight"] != out[key]
            ratio = src[key].float() / out[key + "_scale"]
            assert differ.sum() <= differ.numel() // 100, key
            assert ((ratio[differ].abs() % 1 - 0.5).abs() < 1e-4).all(), key
            assert ((recompressed["weight"].int() - out[key].int()).abs() <= 1).all(), key
            assert "weight_zero_point" not in recompressed  # symmetric: no zero point stored, as we write it


def test_runtime_runs_w8a8(tiny, quantized, tmp_path, run_cli):
    from internvl_tools.runtime.model import InternVLRuntime

    folder = quantized("InternVL2-1B")
    image = tmp_path / "img.png"
    sample_image(4).save(image)
    result = run_cli("chat", folder, "What is in the image?", "--image", image, "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    bf16, w8a8, bnb = InternVLRuntime(tiny("InternVL2-1B")), InternVLRuntime(folder), InternVLRuntime(quantized("InternVL2-1B", "bnb"))
    _, ids = w8a8.generate("What is in the image?", sample_image(4), max_new_tokens=4)
    assert json.loads(result.output)["token_ids"] == ids
    pixels = bf16.pixel_values(sample_image(4))
    prompt = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    assert torch.equal(w8a8.image_features(pixels), bf16.image_features(pixels))  # vision untouched
    want, got = bf16.logits(prompt, pixels), w8a8.logits(prompt, pixels)
    assert (got - want).norm() / want.norm() < 0.03
    assert torch.equal(got, bnb.logits(prompt, pixels))  # the same dequantized weights as the bnb path
    report = json.loads(run_cli("inspect", folder, "--json").output)
    assert report["quantization"]["format"] == "compressed_tensors_int8"
    assert report["params"] == json.loads(run_cli("inspect", tiny("InternVL2-1B"), "--json").output)["params"]


@pytest.mark.requires("compressed_tensors")
def test_native_w8a8_loads_in_transformers(tiny, tmp_path, quantized, run_cli):
    """convert --to hf -> quantize --format w8a8: transformers + compressed-tensors load it with no
    missing keys, keep the vision tower, projector and head in float, and compute close to our runtime."""
    from transformers import AutoModelForImageTextToText

    from internvl_tools.runtime.model import InternVLRuntime

    native = tmp_path / "hf"
    assert run_cli("convert", tiny("InternVL2-Llama3-76B"), "-o", native).exit_code == 0
    folder = quantized("InternVL2-Llama3-76B", "w8a8", native)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", r"re:(?:lm_head|language_model\.lm_head)$"]
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert getattr(model.model.language_model.layers[0].mlp.down_proj, "quantization_scheme", None) is not None
    for kept in (model.model.vision_tower.encoder.layer[0].attention.q_proj, model.model.multi_modal_projector.linear_1, model.lm_head):
        assert getattr(kept, "quantization_scheme", None) is None
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()
    want = InternVLRuntime(folder).logits(ids)
    assert (theirs[0] - want[0]).norm() / want[0].norm() < 0.03  # they round scales to bf16 and fake-quantize activations


def test_w8a8_refusals(tiny, tmp_path, run_cli):
    from internvl_tools.errors import InputError

    ct = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    with pytest.raises(InputError, match="num_bits 8"):
        detect({"quantization_config": {**ct, "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}})
    with pytest.raises(InputError, match="fp8"):
        detect({"quantization_config": {**ct, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}}}})
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "x", "--method", "gptq", "--format", "w8a8")
    assert result.exit_code == 2 and "--format gptq or compressed-tensors" in result.output, result.output
