"""The InternVL2.5 / 3 / 3.5 families and the qwen3 / internlm3 dialects as data: real shapes,
names in `inspect`, tiny and wide checkpoints, the models refused, and no remote-code prompt."""

from __future__ import annotations

import json
import re
import time

import pytest

from internvl_tools.models.dialects import NOT_SUPPORTED, get_dialect
from internvl_tools.models.families import FAMILIES, identify, tiny_family, wide_family
from internvl_tools.models.layout import build_layout
from internvl_tools.tiny.generator import llm_layer_shapes, llm_tensors, make_config, projector_tensors, vision_tensors

NEWER = [name for name in FAMILIES if name.startswith(("InternVL2.5-", "InternVL3-", "InternVL3.5-"))]

# parameter counts published for two of them (OpenExplorer's deployment cards count the upstream tensors): the totals
# pin vocabulary, widths and depths to the unit of the third decimal; the names' sizes bound the others
PUBLISHED_B = {"InternVL3.5-1B": 1.061, "InternVL2.5-2B": 2.206}


def _real(name: str):
    family = FAMILIES[name]
    specs = [p.spec for p in vision_tensors(family) + llm_tensors(family) + projector_tensors(family)]
    return family, specs, make_config(family)


@pytest.mark.parametrize("name", NEWER)
def test_real_shapes_and_names(name):
    family, specs, config = _real(name)
    layout = build_layout(config, specs)
    total = sum(s.numel for s in specs) / 1e9
    named = float(re.search(r"-(\d+(?:\.\d+)?)B", name).group(1))  # 30B-A3B: 30 in all
    assert 0.8 * named < total < 1.25 * named
    if name in PUBLISHED_B:
        assert abs(total - PUBLISHED_B[name]) < 0.0005
    assert (family.template, family.ps_version, family.select_layer, family.downsample_ratio) == ("internvl2_5", "v2", -1, 0.5)
    assert (family.max_dynamic_patch, family.use_thumbnail, family.dynamic_image_size) == (12, True, True)
    assert family.vision.name.endswith("-448px-V2_5")
    args = (family.vision.norm_type, layout.dialect, family.ps_version, family.llm.hidden_size, family.template)
    assert identify(*args, name_hint=f"/ckpt/{name}", llm_layers=layout.llm_layers) == name
    assert name in identify(*args, llm_layers=layout.llm_layers).split(" / ")  # same LLM shape: InternVL2.5-1B / InternVL3-1B


@pytest.mark.parametrize("hint,name", [
    ("OpenGVLab/InternVL2_5-8B-MPO", "InternVL2.5-8B"), ("OpenGVLab/InternVL3_5-1B-Instruct", "InternVL3.5-1B"),
    ("/mnt/share/InternVL3-9B", "InternVL3-9B"), ("OpenGVLab/InternVL3-14B", "InternVL3-14B"),
])
def test_published_repository_names_name_the_family(hint, name):
    family, specs, config = _real(name)
    layout = build_layout(config, specs)
    args = (family.vision.norm_type, layout.dialect, family.ps_version, family.llm.hidden_size, family.template)
    assert identify(*args, name_hint=hint, llm_layers=layout.llm_layers) == name


def test_qwen3_and_internlm3_layers():
    """Qwen3: no q/k/v bias, q/k norms over head_dim = 128, q wider than the model where hidden / heads != 128."""
    shapes = llm_layer_shapes(FAMILIES["InternVL3.5-1B"])
    assert shapes["self_attn.q_proj"] == (2048, 1024) and shapes["self_attn.k_proj"] == (1024, 1024)
    assert shapes["self_attn.o_proj"] == (1024, 2048) and shapes["mlp.down_proj"] == (1024, 3072)
    keys = {p.spec.name: p.spec.shape for p in llm_tensors(FAMILIES["InternVL3.5-1B"])}
    assert keys["language_model.model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert "language_model.model.layers.0.self_attn.q_proj.bias" not in keys
    assert get_dialect("qwen3").extra_norms == ("self_attn.q_norm", "self_attn.k_norm")
    internlm3 = llm_layer_shapes(FAMILIES["InternVL3-9B-InternLM3"])
    assert internlm3["self_attn.k_proj"] == (256, 4096) and internlm3["mlp.gate_proj"] == (10240, 4096)
    assert llm_layer_shapes(FAMILIES["InternVL3-9B"])["attention.wqkv"] == ((32 + 2 * 2) * 128, 4096)  # as published
    llm = make_config(FAMILIES["InternVL3-9B-InternLM3"])["llm_config"]
    assert (llm["architectures"], llm["head_dim"], llm["rope_scaling"]) == (["InternLM3ForCausalLM"], 128, {"factor": 6.0, "rope_type": "dynamic"})


@pytest.mark.parametrize("name,head_dim", [("InternVL3.5-1B", 32), ("InternVL3.5-2B", 16), ("InternVL3.5-4B", 32),
                                           ("InternVL3-9B-InternLM3", 16), ("InternVL3-9B", None)])
def test_tiny_keeps_head_dim_explicit(name, head_dim):
    tiny = tiny_family(FAMILIES[name], vocab_size=256)
    assert tiny.llm.head_dim == head_dim
    llm = make_config(tiny)["llm_config"]
    assert llm.get("head_dim") == head_dim
    shapes = llm_layer_shapes(tiny)
    if head_dim is None:  # InternLM2 keys: fused wqkv of 4 query + 2 x 2 KV heads of 64 / 4
        assert shapes["attention.wqkv"] == ((4 + 2 * 2) * 16, 64)
    else:
        assert shapes["self_attn.q_proj"] == (4 * head_dim, 64) and shapes["self_attn.o_proj"] == (64, 4 * head_dim)


@pytest.mark.parametrize("name", NEWER)
def test_make_tiny_writes_every_family(name, tmp_path, run_cli):
    out = tmp_path / "t"
    assert run_cli("make-tiny", name, out).exit_code == 0
    report = json.loads(run_cli("inspect", out, "--json").output)
    assert report["family"] == f"{name} (reduced size)"


def test_wide_keeps_true_widths():
    """make-tiny --wide (checked by hand on InternVL3.5-1B: a 0.9 GB checkpoint, too big for the suite)."""
    shapes = {p.spec.name: p.spec.shape for p in llm_tensors(wide_family(FAMILIES["InternVL3.5-1B"]))}
    assert shapes["language_model.model.layers.1.self_attn.q_proj.weight"] == (2048, 1024)
    assert shapes["language_model.model.layers.1.self_attn.k_norm.weight"] == (128,)
    assert shapes["language_model.model.embed_tokens.weight"] == (151936, 1024)
    assert "language_model.model.layers.2.mlp.down_proj.weight" not in shapes


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["llm_config"].update(architectures=["GptOssForCausalLM"], model_type="gpt_oss"), "InternVL3.5-20B-A4B"),
    (lambda c: c.update(_name_or_path="OpenGVLab/InternVL3_5-241B-A28B") or c["llm_config"].update(architectures=["Qwen3MoeForCausalLM"]),
     "InternVL3.5-241B-A28B"),
    (lambda c: c["llm_config"].update(architectures=["Qwen3MoeForCausalLM"], hidden_size=4096, num_hidden_layers=94, num_experts=128),
     "InternVL3.5-241B-A28B"),
])
def test_unsupported_models_refused_in_one_line(edit, needle, tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL3.5-2B"))
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert needle in result.output and "not supported yet" in result.output


def test_unsupported_native_text_configs_refused():
    from internvl_tools.errors import LayoutError
    from internvl_tools.models.dialects import dialect_of_native_model_type

    with pytest.raises(LayoutError, match="InternVL3.5-20B-A4B.*not supported yet"):
        dialect_of_native_model_type("gpt_oss", "config.json: text_config.model_type")
    text = {"model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94, "num_experts": 128}
    with pytest.raises(LayoutError, match="InternVL3.5-241B-A28B"):
        dialect_of_native_model_type("qwen3_moe", "config.json: text_config.model_type", text)
    assert dialect_of_native_model_type("qwen3", "x").name == "qwen3"
    assert dialect_of_native_model_type("llama", "x").name == "llama"  # InternLM2 / InternLM3 read back as Llama


def test_unknown_llm_lists_the_supported_ones(tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL3.5-2B"))
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Gemma2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "Qwen3ForCausalLM" in result.output and "InternLM3ForCausalLM" in result.output
    assert {r.architectures[0] for r in NOT_SUPPORTED} == {"GptOssForCausalLM", "Qwen3MoeForCausalLM"}


def test_chat_never_asks_about_remote_code(tiny, copy_of, run_cli, monkeypatch):
    """A config.json with an auto_map (every published InternVL has one) must not make transformers ask on
    stdin whether to run the remote code (it would wait for an answer): any read of stdin fails this test."""
    folder = copy_of(tiny("InternVL3.5-2B"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (folder / "config.json").write_text(json.dumps(config))

    prompts = []

    def no_prompt(*args, **kwargs):
        prompts.append(args)
        raise EOFError  # what a closed stdin answers; transformers then goes on without the remote code

    monkeypatch.setattr("builtins.input", no_prompt)
    started = time.perf_counter()
    result = run_cli("chat", folder, "hi", "--max-new-tokens", "2", "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    assert prompts == []
    assert "custom code" not in result.output and len(json.loads(result.output)["token_ids"]) <= 2
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("typed, name", [("OpenGVLab/InternVL2_5-8B", "InternVL2.5-8B"), ("InternVL3_5-30B-A3B", "InternVL3.5-30B-A3B"),
                                         ("internvl2-llama3-76b", "InternVL2-Llama3-76B")])
def test_make_tiny_takes_the_hub_spelling(typed, name, tmp_path, run_cli):
    result = run_cli("make-tiny", typed, tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert json.loads(run_cli("inspect", tmp_path / "t", "--json").output)["family"] == f"{name} (reduced size)"
