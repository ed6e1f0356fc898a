"""Key classification of every seed family; dialects; LoRA; unknown keys and configs refused."""

from __future__ import annotations

import json

import pytest

from internvl_tools.models.families import FAMILIES, tiny_family
from internvl_tools.models.layout import build_layout, classify_key, llm_dialect
from internvl_tools.errors import LayoutError
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.tiny.generator import make_config, projector_tensors, vision_tensors, llm_tensors

from .conftest import DIALECT_FAMILIES

EXPECTED_DIALECT = {
    "InternVL-Chat-V1-1": "llama", "InternVL-Chat-V1-2": "llama", "InternVL-Chat-V1-2-Plus": "llama",
    "InternVL2-1B": "qwen2", "InternVL2-2B": "internlm2", "InternVL2-4B": "phi3", "InternVL2-8B": "internlm2",
    "InternVL2-26B": "internlm2", "InternVL2-40B": "llama", "InternVL2-Llama3-76B": "llama",
    "InternVL2.5-1B": "qwen2", "InternVL3-9B": "internlm2", "InternVL3-9B-InternLM3": "internlm3",
    "InternVL3.5-1B": "qwen3", "InternVL3.5-2B": "qwen3", "InternVL3.5-30B-A3B": "qwen3_moe",
}


@pytest.mark.parametrize("family", DIALECT_FAMILIES)
def test_every_key_of_every_family_classified(family, tiny):
    with CheckpointReader(tiny(family)) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
    assert layout.dialect == EXPECTED_DIALECT[family]
    assert layout.vision_layers == config["vision_config"]["num_hidden_layers"]
    assert layout.llm_layers == config["llm_config"]["num_hidden_layers"]
    families = {info.family for info in layout.keys.values()}
    assert families == {"vision", "projector", "llm"}
    parts = {(i.family, i.part) for i in layout.keys.values()}
    assert {("vision", "embeddings"), ("vision", "layer"), ("projector", "mlp1"), ("llm", "embeddings"),
            ("llm", "layer"), ("llm", "final_norm"), ("llm", "head")} == parts
    # each decoder layer holds the same number of keys, all of them numbered
    counts = {n: len(layout.llm_layer_keys(n)) for n in range(layout.llm_layers)}
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_size_key_sets_classify(family):
    """The real-width key set (from the family facts, no tensors) classifies too."""
    fam = FAMILIES[family]
    planned = vision_tensors(fam) + llm_tensors(fam) + projector_tensors(fam)
    layout = build_layout(make_config(fam), [p.spec for p in planned])
    assert layout.llm_layers == fam.llm.num_hidden_layers
    assert layout.vision_layers == fam.vision.num_hidden_layers


def test_specific_keys():
    info = classify_key("language_model.model.layers.17.attention.wqkv.weight", "internlm2")
    assert (info.family, info.part, info.layer, info.module, info.param, info.is_linear) == ("llm", "layer", 17, "attention.wqkv", "weight", True)
    info = classify_key("vision_model.encoder.layers.3.ls1", "llama")
    assert (info.family, info.layer, info.module, info.is_linear) == ("vision", 3, "ls1", False)
    info = classify_key("language_model.base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight", "llama")
    assert (info.lora, info.plain_key, info.layer) == ("B", "language_model.model.layers.2.self_attn.q_proj.weight", 2)
    info = classify_key("vision_model.base_model.model.encoder.layers.0.attn.qkv.base_layer.weight", "llama")
    assert (info.lora, info.plain_key) == (None, "vision_model.encoder.layers.0.attn.qkv.weight")
    assert classify_key("mlp1.3.weight", "phi3").is_linear
    assert classify_key("language_model.output.weight", "internlm2").part == "head"


@pytest.mark.parametrize("key,dialect", [
    ("language_model.model.layers.0.attention.wqkv.weight", "llama"),   # internlm2 key in a llama checkpoint
    ("language_model.model.layers.0.self_attn.q_proj.weight", "internlm2"),
    ("vision_model.encoder.layers.0.attn.mystery.weight", "llama"),
    ("mlp2.0.weight", "llama"),
    ("model.layers.0.self_attn.q_proj.weight", "llama"),
])
def test_unknown_keys_refused(key, dialect):
    with pytest.raises(LayoutError, match="not part of an InternVL"):
        classify_key(key, dialect)


def test_unknown_llm_architecture():
    with pytest.raises(LayoutError, match="MistralForCausalLM"):
        llm_dialect({"llm_config": {"architectures": ["MistralForCausalLM"]}})


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["llm_config"].update(num_hidden_layers=7), "num_hidden_layers is 7"),
    (lambda c: c["vision_config"].update(num_hidden_layers=9), "vision_config.num_hidden_layers"),
    (lambda c: c["llm_config"].update(hidden_size=128), "llm_config.hidden_size"),
    (lambda c: c["vision_config"].update(hidden_size=48), "vision_config.hidden_size"),
    (lambda c: c.update(model_type="llava", architectures=["LlavaForConditionalGeneration"]), "not InternVL"),
    (lambda c: c["llm_config"].update(architectures=["GPT2LMHeadModel"]), "not a supported LLM"),
    # heads that do not fit the q/k/v rows (the forward pass would crash in a reshape), widths, bias, ps_version
    (lambda c: c["llm_config"].update(num_attention_heads=8), "llm_config.num_attention_heads 8"),
    (lambda c: c["llm_config"].update(num_key_value_heads=4), "num_key_value_heads 4 imply language_model.model.layers.0.self_attn.k_proj"),
    (lambda c: c["llm_config"].update(intermediate_size=128), "llm_config.intermediate_size 128"),
    (lambda c: c["vision_config"].update(num_attention_heads=3), "vision_config.num_attention_heads is 3"),
    (lambda c: c["vision_config"].update(intermediate_size=100), "vision_config.intermediate_size"),
    (lambda c: c["vision_config"].update(qkv_bias=True), "vision_config.qkv_bias"),
    (lambda c: c.update(ps_version="v3"), "ps_version 'v3' is not supported; supported: v1, v2"),
])
def test_config_disagreeing_with_tensors_exits_2(tiny, copy_of, run_cli, edit, needle):
    folder = copy_of(tiny("InternVL2-40B"))
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2
    assert needle in result.output and result.output.count("\n") == 1


def test_unknown_key_in_checkpoint_exits_2(tmp_path, run_cli):
    import torch
    from safetensors.torch import save_file

    fam = tiny_family(FAMILIES["InternVL2-1B"], vocab_size=64)
    (tmp_path / "config.json").write_text(json.dumps(make_config(fam)))
    save_file({"language_model.model.layers.0.block_sparse_moe.gate.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 2 and "block_sparse_moe" in result.output


@pytest.mark.parametrize("lora,expected", [("embedded", {"llm", "vision"}), ("embedded-llm", {"llm"}), ("embedded-vision", {"vision"})])
def test_embedded_lora_detected(tiny, lora, expected):
    with CheckpointReader(tiny("InternVL2-4B", lora=lora)) as reader:
        layout = build_layout(reader.config(), reader.specs())
    assert set(layout.lora) == expected
    for info in layout.lora.values():
        assert info.rank == 4 and info.config_flag == 4
    if "llm" in expected:
        assert layout.lora["llm"].targets == ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")
        assert layout.lora["llm"].count == 4 * 3
