"""InternVL3.5-30B-A3B (Qwen3-MoE) through every command: the qwen3_moe dialect and its experts in the layout,
make-tiny and inspect (experts, active parameters), the runtime's fused experts, the native keys transformers
writes, shard --gpus, merge-lora and int8 on experts (the router kept). GPTQ's per-expert calibration is in
test_gptq_moe.py."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.errors import LayoutError
from internvl_tools.evaluate.inspect import expert_report
from internvl_tools.formats import plain
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.models.dialects import NOT_SUPPORTED, dialect_of_native_model_type, get_dialect
from internvl_tools.models.families import FAMILIES, tiny_family, wide_family
from internvl_tools.models.layout import build_layout, classify_key
from internvl_tools.planners.device_map import plan_devices
from internvl_tools.runtime.build import build_decoder_layer
from internvl_tools.runtime.model import InternVLRuntime
from internvl_tools.tiny.generator import llm_layer_shapes, llm_tensors, make_config, make_peft_adapter, projector_tensors, vision_tensors

from .support import HeaderOnly, all_tensors, real_sizes, sample_image

MOE = "InternVL3.5-30B-A3B"
GB = 10**9


def _real():
    family = FAMILIES[MOE]
    specs = [p.spec for p in vision_tensors(family) + llm_tensors(family) + projector_tensors(family)]
    return family, specs, make_config(family)


def test_real_shapes_parameters_and_active_parameters():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active per token (Qwen's model card); 48 sparse layers of 128 experts."""
    family, specs, config = _real()
    layout = build_layout(config, specs)
    assert layout.dialect == "qwen3_moe" and layout.llm_layers == 48
    llm = {s.name: s for s in specs if s.name.startswith("language_model.")}
    total = sum(s.numel for s in llm.values())
    assert 30.4e9 < total < 30.6e9
    shapes = llm_layer_shapes(family)
    assert shapes["mlp.gate"] == (128, 2048) and shapes["mlp.experts.127.down_proj"] == (2048, 768)
    assert shapes["mlp.experts.0.gate_proj"] == shapes["mlp.experts.0.up_proj"] == (768, 2048)
    assert shapes["self_attn.q_proj"] == (4096, 2048) and shapes["self_attn.k_proj"] == (512, 2048)
    assert not any(name.startswith("mlp.") and "experts" not in name and name != "mlp.gate" for name in shapes)  # no dense MLP
    report = expert_report(HeaderOnly(specs), layout, plain.FORMAT, {}, config["llm_config"])
    assert (report["count"], report["top_k"], report["intermediate_size"], report["norm_topk_prob"]) == (128, 8, 768, True)
    assert report["params"] == 48 * 128 * 3 * 768 * 2048 and report["router_params"] == 48 * 128 * 2048
    active_llm = total - report["params"] + report["active_params"]
    assert 3.2e9 < active_llm < 3.45e9
    llm_config = config["llm_config"]
    assert (llm_config["num_experts"], llm_config["num_experts_per_tok"], llm_config["moe_intermediate_size"]) == (128, 8, 768)
    assert (llm_config["vocab_size"], llm_config["head_dim"], llm_config["num_key_value_heads"]) == (151936, 128, 4)


def test_keys_experts_and_router():
    info = classify_key("language_model.model.layers.47.mlp.experts.127.down_proj.weight", "qwen3_moe")
    assert (info.layer, info.module, info.expert, info.is_linear) == (47, "mlp.experts.127.down_proj", 127, True)
    router = classify_key("language_model.model.layers.3.mlp.gate.weight", "qwen3_moe")
    assert (router.module, router.expert, router.is_linear) == ("mlp.gate", None, False)  # never quantized
    lora = classify_key("language_model.base_model.model.model.layers.1.mlp.experts.2.up_proj.lora_A.default.weight", "qwen3_moe")
    assert (lora.lora, lora.expert, lora.plain_key) == ("A", 2, "language_model.model.layers.1.mlp.experts.2.up_proj.weight")
    with pytest.raises(LayoutError):
        classify_key("language_model.model.layers.3.mlp.gate_proj.weight", "qwen3_moe")  # no dense MLP in a sparse layer
    with pytest.raises(LayoutError):
        classify_key("language_model.model.layers.3.mlp.experts.1.w1.weight", "qwen3_moe")
    experts = get_dialect("qwen3_moe").experts
    assert experts.parse("mlp.experts.12.up_proj") == (12, "up_proj") and experts.parse("mlp.gate") is None
    assert experts.fused_slot("up_proj") == ("gate_up_proj", 1, 2) and experts.fused_slot("down_proj") == ("down_proj", 0, 1)


def test_only_the_241b_stays_refused():
    assert dialect_of_native_model_type("qwen3_moe", "x").name == "qwen3_moe"
    assert [r.model for r in NOT_SUPPORTED if "Qwen3MoeForCausalLM" in r.architectures] == ["InternVL3.5-241B-A28B, Qwen3-235B-A22B"]
    text = {"model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94, "num_experts": 128}
    with pytest.raises(LayoutError, match="241B"):
        dialect_of_native_model_type("qwen3_moe", "x", text)


def test_tiny_and_wide_keep_the_experts():
    tiny = tiny_family(FAMILIES[MOE], vocab_size=256)
    assert (tiny.llm.moe.num_experts, tiny.llm.moe.num_experts_per_tok, tiny.llm.moe.moe_intermediate_size) == (4, 2, 32)
    wide = wide_family(FAMILIES[MOE], llm_layers=1)
    shapes = {p.spec.name: p.spec.shape for p in llm_tensors(wide)}
    assert shapes["language_model.model.layers.0.mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert "language_model.model.layers.1.mlp.gate.weight" not in shapes


def test_make_tiny_and_inspect(tiny, run_cli):
    report = json.loads(run_cli("inspect", tiny(MOE), "--json").output)
    assert report["family"] == f"{MOE} (reduced size)" and report["llm"]["dialect"] == "qwen3_moe"
    moe = report["llm"]["experts"]
    assert (moe["count"], moe["top_k"], moe["intermediate_size"], moe["sparse_layers"]) == (4, 2, 32, 3)
    assert moe["params"] == 3 * 4 * 3 * 32 * 64 and moe["active_params"] == moe["params"] // 2
    assert report["params"]["active"] == report["params"]["total"] - moe["params"] // 2
    assert report["memory_estimate"]["int8"] < report["memory_estimate"]["bf16"]
    text = run_cli("inspect", tiny(MOE)).output
    assert "top-2" in text and "active per token" in text


def test_runtime_fuses_experts_as_transformers_does(tiny):
    """gate_up_proj[e] = [gate_e; up_e], down_proj[e] = down_e, read expert by expert from the per-expert tensors."""
    with CheckpointReader(tiny(MOE)) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        layer, _ = build_decoder_layer(reader, config, layout, 1, torch.float32)
        p = "language_model.model.layers.1.mlp."
        for e in range(4):
            gate, up, down = (reader.get(f"{p}experts.{e}.{n}_proj.weight").float() for n in ("gate", "up", "down"))
            assert torch.equal(layer.mlp.experts.gate_up_proj[e], torch.cat([gate, up]))
            assert torch.equal(layer.mlp.experts.down_proj[e], down)
        assert torch.equal(layer.mlp.gate.weight, reader.get(p + "gate.weight").float())
    assert layer.mlp.experts.config._experts_implementation == "eager"


def test_config_that_disagrees_with_the_experts_is_refused(tiny, copy_of):
    folder = copy_of(tiny(MOE))
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["num_experts"] = 8  # the tensors hold 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match="config"):
        InternVLRuntime(folder)


def test_native_keys_are_the_ones_transformers_saves(tiny, tmp_path, run_cli):
    """convert --to hf writes every expert on its own, as save_pretrained of a Qwen3MoeForCausalLM does."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    llm = json.loads((tiny(MOE) / "config.json").read_text())["llm_config"]
    keys = {k: v for k, v in llm.items() if k not in ("architectures", "_name_or_path", "torch_dtype")}
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**keys)).save_pretrained(tmp_path / "saved")
    theirs = {k.removeprefix("model.") for k in all_tensors(tmp_path / "saved") if k.startswith("model.layers.0.")}
    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    native = all_tensors(tmp_path / "hf")
    ours = {k.removeprefix("model.language_model.") for k in native if k.startswith("model.language_model.layers.0.")}
    assert ours == theirs
    assert "layers.0.mlp.experts.3.down_proj.weight" in ours and "layers.0.mlp.gate.weight" in ours
    back = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    assert (back["model_type"], back["num_experts"], back["num_experts_per_tok"], back["norm_topk_prob"]) == ("qwen3_moe", 4, 2, True)


def test_shard_gpus_keeps_each_sparse_layer_whole(tiny, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli("shard", tiny(MOE), "-o", out, "--gpus", "2", "--gpu-memory", "600KB", "--reserve", "1KB",
                     "--context", "4", "--max-shard-size", "40KB", "--json")
    assert result.exit_code == 0, result.output
    device_map = json.loads((out / "device_map.json").read_text())
    layers = {k: v for k, v in device_map.items() if ".layers." in k}
    assert set(layers) == {f"language_model.model.layers.{n}" for n in range(3)}  # whole layers: router + experts together
    assert set(device_map.values()) == {0, 1}
    runtime = InternVLRuntime(out, device_map={k: "cpu" for k in device_map})
    reference = InternVLRuntime(tiny(MOE))
    ids = torch.tensor([[3, 5, 8, 13, 21]])
    torch.testing.assert_close(runtime.logits(ids), reference.logits(ids))


def test_real_layer_bytes_hold_every_expert():
    sizes = real_sizes(MOE)
    per_layer = 128 * 3 * 768 * 2048 * 2 + 128 * 2048 * 2 + (4096 + 512 + 512) * 2048 * 2 + 4096 * 2048 * 2 + 2 * 2048 * 2 + 2 * 128 * 2
    assert sizes.layer_bytes == (per_layer,) * 48
    assert plan_devices(sizes, 1, 80 * GB).fits and not plan_devices(sizes, 1, 48 * GB).fits
    assert plan_devices(real_sizes(MOE, "int4"), 1, 32 * GB).fits  # the experts' bytes shrink with the rest
    assert not plan_devices(real_sizes(MOE, "int8"), 1, 32 * GB).fits


def test_merge_lora_on_experts_leaves_the_router(tiny, tmp_path, run_cli):
    adapter = make_peft_adapter(tiny(MOE), tmp_path / "adapter", rank=2, alpha=4)
    out = tmp_path / "merged"
    result = run_cli("merge-lora", tiny(MOE), "-o", out, "--adapter", adapter, "--json")
    assert result.exit_code == 0, result.output
    base, merged = all_tensors(tiny(MOE)), all_tensors(out)
    lora = all_tensors(adapter)
    key = "language_model.model.layers.2.mlp.experts.3.down_proj.weight"
    a, b = (lora[f"base_model.model.model.layers.2.mlp.experts.3.down_proj.lora_{x}.weight"] for x in "AB")
    want = (base[key].float() + 2.0 * b.float() @ a.float()).to(torch.bfloat16)
    torch.testing.assert_close(merged[key].float(), want.float(), rtol=0, atol=1e-2)
    assert not torch.equal(merged[key], base[key])
    for n in range(3):
        assert torch.equal(merged[f"language_model.model.layers.{n}.mlp.gate.weight"], base[f"language_model.model.layers.{n}.mlp.gate.weight"])


def test_merge_lora_merges_the_router_when_the_adapter_has_it(tiny, tmp_path, run_cli):
    adapter = make_peft_adapter(tiny(MOE), tmp_path / "router", rank=2, alpha=2, targets=["mlp.gate"])
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == ["gate"]
    out = tmp_path / "merged"
    assert run_cli("merge-lora", tiny(MOE), "-o", out, "--adapter", adapter).exit_code == 0
    base, merged = all_tensors(tiny(MOE)), all_tensors(out)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"language_model.model.layers.{n}.mlp.gate.weight" for n in range(3)}


@pytest.mark.requires("bitsandbytes", "compressed_tensors")
def test_int8_experts_and_router(tiny, tmp_path, run_cli):
    """compressed-tensors: every expert in 8 bits, transformers fuses them back; bnb: experts stay bf16 (its
    loaders convert nn.Linear only); the router stays as it is in both."""
    from transformers import AutoModelForImageTextToText

    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    for fmt in ("compressed-tensors", "bnb"):
        out = tmp_path / fmt
        result = run_cli("quantize", tmp_path / "hf", "-o", out, "--method", "int8", "--format", fmt)
        assert result.exit_code == 0, result.output
        tensors = all_tensors(out)
        router = "model.language_model.layers.1.mlp.gate.weight"
        assert tensors[router].dtype == torch.bfloat16
        expert = "model.language_model.layers.1.mlp.experts.2.up_proj"
        if fmt == "bnb":
            assert tensors[expert + ".weight"].dtype == torch.bfloat16 and expert + ".SCB" not in tensors
            assert tensors["model.language_model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
        else:
            assert expert + ".weight_packed" in tensors and expert + ".weight" not in tensors
        model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (fmt, info)
        fused = model.model.language_model.layers[1].mlp.experts.gate_up_proj
        assert fused.dtype == torch.bfloat16
        base = all_tensors(tiny(MOE))["language_model.model.layers.1.mlp.experts.2.up_proj.weight"].float()
        torch.testing.assert_close(fused[2, 32:].float(), base, rtol=0, atol=base.abs().max().item() / 100)
        runtime = InternVLRuntime(out)  # our runtime reads the quantized experts dequantized
        pixels = runtime.pixel_values(sample_image(4))
        ids = runtime.prompt_ids("What is it?", pixels.shape[0])
        got, want = runtime.logits(ids, pixels), InternVLRuntime(tiny(MOE)).logits(ids, pixels)
        assert (got - want).abs().mean() < 0.01 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("layout", ["original", "native"])
def test_inspect_and_shard_gpus_agree_across_layouts(layout, tiny, tmp_path, run_cli):
    """The native layout (convert --to hf) reports the same experts and active parameters, and shard --gpus keeps
    each sparse layer whole under its native module name."""
    folder = tiny(MOE)
    if layout == "native":
        assert run_cli("convert", folder, "-o", tmp_path / "hf").exit_code == 0
        folder = tmp_path / "hf"
    report = json.loads(run_cli("inspect", folder, "--json").output)
    original = json.loads(run_cli("inspect", tiny(MOE), "--json").output)
    assert report["llm"]["experts"] == original["llm"]["experts"] and report["params"] == original["params"]
    out = tmp_path / "out"
    result = run_cli("shard", folder, "-o", out, "--gpus", "2", "--gpu-memory", "600KB", "--reserve", "1KB", "--context", "4", "--json")
    assert result.exit_code == 0, result.output
    prefix = "language_model.model.layers." if layout == "original" else "model.language_model.layers."
    device_map = json.loads((out / "device_map.json").read_text())
    assert {k for k in device_map if ".layers." in k} == {f"{prefix}{n}" for n in range(3)}


@pytest.mark.requires("bitsandbytes")
def test_bnb_int8_is_what_transformers_load_in_8bit_saves(tiny, tmp_path, run_cli):
    """The reference for what bnb int8 does with experts: transformers' own BitsAndBytesConfig(load_in_8bit=True) on the
    native model, saved with save_pretrained. It converts nn.Linear modules only, so Qwen3-MoE's fused experts
    (Qwen3MoeExperts: 3-D parameters) stay bf16 and are saved per expert in bf16; ours holds the same tensors with
    the same dtypes (int8 values within one step of its rounding), and the summary says why the experts are kept."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    native = tmp_path / "hf"
    assert run_cli("convert", tiny(MOE), "-o", native).exit_code == 0
    result = run_cli("quantize", native, "-o", tmp_path / "ours", "--method", "int8", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert result.stderr.startswith("warning: ") and "Qwen3MoeExperts" in result.stderr
    assert summary["experts"]["quantized"] == 0 and summary["experts"]["kept"] == 3 * 4 * 3
    assert "nn.Linear" in summary["experts"]["note"] and "Qwen3MoeExperts" in summary["experts"]["note"]
    skip = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[m for m in skip if ".experts" not in m])
    model = AutoModelForImageTextToText.from_pretrained(native, quantization_config=bnb, device_map="cpu")
    assert type(model.model.language_model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "theirs")
    theirs, ours = all_tensors(tmp_path / "theirs"), all_tensors(tmp_path / "ours")
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    for key, tensor in theirs.items():
        if tensor.dtype == torch.int8:
            assert (ours[key].int() - tensor.int()).abs().max() <= 1, key
        elif tensor.dtype != torch.uint8:
            torch.testing.assert_close(ours[key].float(), tensor.float(), rtol=1e-3, atol=1e-5)
    assert ours["model.language_model.layers.2.mlp.experts.3.down_proj.weight"].dtype == torch.bfloat16


@pytest.mark.requires("compressed_tensors")
def test_w8a8_experts_are_for_vllm_and_said_so(tiny, tmp_path, run_cli):
    """W8A8 (int-quantized) experts: transformers' compressed-tensors loader rebuilds fused experts only from packed or
    fp8 weights, so it cannot load them (checked here: when a transformers release can, this test says so); the
    summary says it and names --format compressed-tensors, which transformers loads (test_int8_experts_and_router)."""
    from transformers import AutoModelForImageTextToText

    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    result = run_cli("quantize", tmp_path / "hf", "-o", tmp_path / "w8a8", "--method", "int8", "--format", "w8a8", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["experts"]["quantized"] == 36 and "vLLM" in summary["experts"]["note"]
    assert "--format compressed-tensors" in summary["experts"]["note"]
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "w8a8", device_map="cpu")
    ct = run_cli("quantize", tmp_path / "hf", "-o", tmp_path / "ct", "--method", "int8", "--format", "compressed-tensors", "--json")
    assert json.loads(ct.stdout)["experts"] == {"quantized": 36, "kept": 0, "note": None}


@pytest.mark.requires("compressed_tensors")
def test_quantized_configs_name_the_router_in_both_layouts(tiny, tmp_path, run_cli):
    """vLLM builds the router as a linear layer (GateLinear) and quantizes it unless a rule names it: every
    compressed-tensors config of a sparse LLM ignores it with one rule that reads the same in both layouts (and
    matches no expert's gate_proj); convert keeps it both ways."""
    import re as regex

    from internvl_tools.formats.rules import router_regex

    rule = router_regex(get_dialect("qwen3_moe"))
    assert router_regex(get_dialect("qwen3")) is None
    for name in ("language_model.model.layers.3.mlp.gate", "model.language_model.layers.3.mlp.gate"):
        assert regex.match(rule, name)
    for name in ("language_model.model.layers.3.mlp.experts.1.gate_proj", "model.language_model.layers.0.mlp.gate_proj"):
        assert not regex.match(rule, name)
    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    for fmt in ("compressed-tensors", "w8a8"):
        for layout, source in (("original", tiny(MOE)), ("native", tmp_path / "hf")):
            out = tmp_path / f"{fmt}-{layout}"
            assert run_cli("quantize", source, "-o", out, "--method", "int8", "--format", fmt).exit_code == 0
            assert f"re:{rule}" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
            back = tmp_path / f"{fmt}-{layout}-converted"
            assert run_cli("convert", out, "-o", back, "--to", "hf" if layout == "original" else "original").exit_code == 0
            assert f"re:{rule}" in json.loads((back / "config.json").read_text())["quantization_config"]["ignore"]


@pytest.mark.requires("bitsandbytes")
def test_bnb_skip_modules_name_experts_and_routers_in_either_layout(tiny, tmp_path, run_cli):
    """bitsandbytes' loaders convert every nn.Linear not named in llm_int8_skip_modules (transformers 4's remote code and
    vLLM build the router as one): int8 names each layer's experts and router, in the layout it writes, and convert
    rewrites them both ways to what quantizing that layout writes (experts named once per layer, not per linear)."""
    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    skips = {}
    for layout, source in (("original", tiny(MOE)), ("native", tmp_path / "hf")):
        out = tmp_path / f"bnb-{layout}"
        assert run_cli("quantize", source, "-o", out, "--method", "int8").exit_code == 0
        skips[layout] = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    for n in range(3):
        assert {f"language_model.model.layers.{n}.mlp.experts", f"language_model.model.layers.{n}.mlp.gate"} <= set(skips["original"])
        assert {f"model.language_model.layers.{n}.mlp.experts", f"model.language_model.layers.{n}.mlp.gate"} <= set(skips["native"])
    for layout, other in (("original", "native"), ("native", "original")):
        back = tmp_path / f"bnb-{layout}-as-{other}"
        assert run_cli("convert", tmp_path / f"bnb-{layout}", "-o", back, "--to", "hf" if other == "native" else "original").exit_code == 0
        assert sorted(json.loads((back / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]) == sorted(skips[other])


def _without(src, out, key):
    """A copy of checkpoint `src` at `out` without tensor `key` (config and side files kept)."""
    from internvl_tools.io.writer import CheckpointWriter

    with CheckpointReader(src) as reader:
        keep = [s for s in reader.specs() if s.name != key]
        assert len(keep) == len(reader.specs()) - 1
        with CheckpointWriter(out, keep, inputs=[src]) as writer:
            for spec in keep:
                writer.write(spec.name, reader.get(spec.name))
            writer.finalize(side_files_from=src)
    return out


def _edit(folder, section, **fields):
    config = json.loads((folder / "config.json").read_text())
    config[section].update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("command", ["inspect", "convert", "shard", "quantize", "export", "chat"])
@pytest.mark.parametrize("missing", ["language_model.model.layers.1.mlp.experts.1.up_proj.weight",
                                     "language_model.model.layers.0.mlp.gate.weight"])
def test_a_missing_expert_or_router_is_refused_by_every_command(tiny, tmp_path, run_cli, command, missing):
    """transformers would load a missing router / expert linear with random weights: refused at open, one line."""
    src = _without(tiny(MOE), tmp_path / "holed", missing)
    out = tmp_path / "out"
    extra = {"inspect": [], "convert": ["-o", out, "--to", "hf"], "shard": ["-o", out], "quantize": ["-o", out, "--method", "int8"],
             "export": ["-o", out], "chat": ["hi"]}[command]
    result = run_cli(command, src, *extra)
    module = missing.removeprefix("language_model.model.").removesuffix(".weight").partition(".")[2].partition(".")[2]
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "config.json" in result.output and module in result.output and "incomplete" in result.output, result.output
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_missing_expert_in_the_native_layout_is_refused(tiny, tmp_path, run_cli):
    native = tmp_path / "hf"
    assert run_cli("convert", tiny(MOE), "-o", native, "--to", "hf").exit_code == 0
    (native / "internvl_original.json").unlink()
    holed = _without(native, tmp_path / "holed", "model.language_model.layers.2.mlp.experts.3.down_proj.weight")
    for args in (["inspect", holed], ["quantize", holed, "-o", tmp_path / "q", "--method", "int8"]):
        result = run_cli(*args)
        assert result.exit_code == 2 and "decoder layer 2 has no mlp.experts.3.down_proj" in result.output, result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("top_k", [5, 0])
def test_top_k_outside_1_to_num_experts_is_refused(tiny, copy_of, run_cli, top_k):
    folder = _edit(copy_of(tiny(MOE)), "llm_config", num_experts_per_tok=top_k)
    for args in (["inspect", folder], ["chat", folder, "hi"]):
        result = run_cli(*args)
        assert result.exit_code == 2 and f"llm_config.num_experts_per_tok is {top_k}" in result.output, result.output
        assert "between 1 and llm_config.num_experts (4)" in result.output


def test_native_top_k_that_disagrees_with_the_sidecar_is_refused(tiny, tmp_path, run_cli):
    native = tmp_path / "hf"
    assert run_cli("convert", tiny(MOE), "-o", native, "--to", "hf").exit_code == 0
    _edit(native, "text_config", num_experts_per_tok=3)  # within range, but the sidecar says 2
    result = run_cli("inspect", native)
    assert result.exit_code == 2 and "internvl_original.json: llm_config.num_experts_per_tok is 2" in result.output, result.output
    assert "text_config.num_experts_per_tok is 3" in result.output


@pytest.mark.parametrize("case", ["unknown-model-type", "head-dim", "num-experts"])
def test_int8_on_a_native_checkpoint_validates_the_config(tiny, tmp_path, run_cli, case):
    """quantize --method int8 opens a native folder through the same checks as every other command."""
    native = tmp_path / "hf"
    assert run_cli("convert", tiny(MOE), "-o", native, "--to", "hf").exit_code == 0
    (native / "internvl_original.json").unlink()
    head_dim = json.loads((native / "config.json").read_text())["text_config"]["head_dim"]
    fields = {"unknown-model-type": {"model_type": "foo"}, "head-dim": {"head_dim": 2 * head_dim}, "num-experts": {"num_experts": 3}}[case]
    _edit(native, "text_config", **fields)
    result = run_cli("quantize", native, "-o", tmp_path / "q", "--method", "int8")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "config.json: text_config." in result.output and next(iter(fields)) in result.output, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "bnb"])
def test_int8_summary_names_the_kept_routers(tiny, tmp_path, run_cli, fmt):
    args = ["quantize", tiny(MOE), "--method", "int8", "--format", fmt]
    report = json.loads(run_cli(*args, "-o", tmp_path / "j", "--json").stdout)
    assert report["kept_routers"] == "mlp.gate of every decoder layer"
    assert "routers kept unquantized: mlp.gate of every decoder layer" in run_cli(*args, "-o", tmp_path / "t").output
