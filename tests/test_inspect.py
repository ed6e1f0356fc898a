"""`inspect` and `make-tiny` end to end through the CLI."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from internvl_tools.io.reader import CheckpointReader

from .conftest import ALL_FAMILIES

NAME_IN_REPORT = {f: f for f in ALL_FAMILIES}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_inspect_json_matches_tensors(family, tiny, run_cli):
    folder = tiny(family)
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["family"] == f"{family} (reduced size)"
    # independent count straight from the safetensors library
    numel = {"vision": 0, "projector": 0, "llm": 0}
    nbytes = dict(numel)
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                t = handle.get_tensor(key)
                fam = "vision" if key.startswith("vision_model.") else "projector" if key.startswith("mlp1.") else "llm"
                numel[fam] += t.numel()
                nbytes[fam] += t.numel() * t.element_size()
    assert report["params"] == {"total": sum(numel.values()), **numel}
    assert report["bytes"] == {"total": sum(nbytes.values()), **nbytes}
    config = json.loads((folder / "config.json").read_text())
    assert report["llm"]["layers"] == config["llm_config"]["num_hidden_layers"] == len(report["llm_layer_bytes"])
    assert report["vision"]["layers"] == config["vision_config"]["num_hidden_layers"]
    assert report["dtypes"]["BF16"]["bytes"] == report["bytes"]["total"]
    assert report["lora"] == {}
    mem = report["memory_estimate"]
    assert mem["bf16"] == report["bytes"]["total"]
    assert mem["int4_g128"] < mem["int8"] < mem["bf16"]


def test_inspect_human_output(tiny, run_cli):
    result = run_cli("inspect", tiny("InternVL2-Llama3-76B", lora="embedded"))
    assert result.exit_code == 0
    for needle in ("InternVL2-Llama3-76B", "LlamaForCausalLM", "InternViT-6B", "LoRA (llm)", "rank 4", "int8"):
        assert needle in result.output


def test_inspect_reports_lora(tiny, run_cli):
    report = json.loads(run_cli("inspect", tiny("InternVL2-2B", lora="embedded"), "--json").output)
    assert report["lora"]["llm"]["rank"] == 4 and report["lora"]["llm"]["alpha"] == 8
    assert report["lora"]["llm"]["targets"] == ["attention.wo", "attention.wqkv", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert report["lora"]["vision"]["targets"] == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    # LoRA factors are not counted as model parameters
    plain = json.loads(run_cli("inspect", tiny("InternVL2-2B"), "--json").output)
    assert report["params"] == plain["params"]


def test_real_family_sizes_in_memory_estimate():
    """The estimate for the real 76B shapes: about 152 GB bf16, half of the LLM in int8."""
    from internvl_tools.models.families import FAMILIES
    from internvl_tools.evaluate.inspect import memory_estimate
    from internvl_tools.tiny.generator import llm_layer_shapes, llm_tensors, projector_tensors, vision_tensors

    fam = FAMILIES["InternVL2-Llama3-76B"]
    specs = [p.spec for p in vision_tensors(fam) + llm_tensors(fam) + projector_tensors(fam)]
    total = sum(s.numel for s in specs)
    assert 75e9 < total < 77e9
    per_layer = sum(r * c for r, c in llm_layer_shapes(fam).values())
    linear = {"params": per_layer * 80, "rows": sum(r for r, _ in llm_layer_shapes(fam).values()) * 80,
              "groups": sum(r * -(-c // 128) for r, c in llm_layer_shapes(fam).values()) * 80,
              "in_features": sum(c for _, c in llm_layer_shapes(fam).values()) * 80}
    mem = memory_estimate(total, linear)
    assert 150e9 < mem["bf16"] < 154e9
    assert 80e9 < mem["int8"] < 90e9
    assert 45e9 < mem["int4_g128"] < 55e9


def test_make_tiny_cli_wide_shapes_and_shards(tmp_path, run_cli):
    out = tmp_path / "t"
    result = run_cli("make-tiny", "InternVL2-1B", out, "--shards", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shards"] == 4
    again = run_cli("make-tiny", "InternVL2-1B", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_make_tiny_is_deterministic(tmp_path, run_cli):
    run_cli("make-tiny", "InternVL2-4B", tmp_path / "a", "--seed", "3")
    run_cli("make-tiny", "InternVL2-4B", tmp_path / "b", "--seed", "3")
    for shard in (tmp_path / "a").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


@pytest.mark.parametrize("family", ["InternVL2-8B", "InternVL2-4B", "InternVL-Chat-V1-1", "InternVL2-1B"])
def test_tiny_tokenizer_has_family_tokens(family, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny(family))
    for token in ("<img>", "</img>", "<IMG_CONTEXT>"):
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
        assert tok.convert_tokens_to_ids(token) < json.loads((tiny(family) / "config.json").read_text())["llm_config"]["vocab_size"]
    ids = tok("A cat <img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == 2
    assert tok.decode(tok("What color is the car?", add_special_tokens=False).input_ids) == "What color is the car?"


def test_wide_family_keeps_true_widths():
    from internvl_tools.models.families import FAMILIES, wide_family
    from internvl_tools.tiny.generator import llm_tensors

    fam = wide_family(FAMILIES["InternVL2-Llama3-76B"])
    shapes = {p.spec.name: p.spec.shape for p in llm_tensors(fam)}
    assert shapes["language_model.model.embed_tokens.weight"] == (128265, 8192)
    assert shapes["language_model.model.layers.1.mlp.down_proj.weight"] == (8192, 28672)
    assert "language_model.model.layers.2.mlp.down_proj.weight" not in shapes


TORCH_PROBE = """
import sys
from internvl_tools.cli.main import cli
for args in sys.argv[1:]:
    try:
        cli(args.split("|"), standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
print("torch imported" if "torch" in sys.modules else "torch-free")
"""


def test_inspect_and_shard_never_import_torch(tiny, tmp_path, run_cli):
    """Byte-level commands stay torch-free on either layout (the native one merges fused specs from headers)."""
    import subprocess
    import sys

    runs = []
    for family in ("InternVL2-1B", "InternVL2-2B", "InternVL-Chat-V1-1"):  # plain, InternLM2 wqkv, v1 transposes
        native = tmp_path / f"{family}-hf"
        assert run_cli("convert", tiny(family), "-o", native).exit_code == 0
        for n, folder in enumerate((tiny(family), native)):
            runs += [f"inspect|{folder}|--json", f"inspect|{folder}|--gpus|2|--json",
                     f"shard|{folder}|-o|{tmp_path / f'{family}-{n}-s'}|--json",
                     f"shard|{folder}|-o|{tmp_path / f'{family}-{n}-g'}|--gpus|2|--json"]
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE, *runs], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-1] == "torch-free"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_native_quantized_internlm2_is_named_as_its_bf16_copy(tiny, tmp_path, run_cli, method):
    """A native GPTQ / AWQ copy of InternLM2 reads its LLM as Llama (packed q/k/v cannot be fused back
    into wqkv), yet it is the same family as the bf16 native copy: the template decides."""
    native = tmp_path / "hf"
    assert run_cli("convert", tiny("InternVL2-2B"), "-o", native).exit_code == 0
    quantized = tmp_path / method
    assert run_cli("quantize", native, "-o", quantized, "--method", method, "--group-size", "32", "--num-samples", "2",
                   "--seq-len", "16").exit_code == 0
    names = {}
    for folder in (native, quantized):
        report = json.loads(run_cli("inspect", folder, "--json").output)
        names[folder.name] = (report["family"], report["llm"]["dialect"])
    assert names == {"hf": ("InternVL2-2B (reduced size)", "internlm2"), method: ("InternVL2-2B (reduced size)", "llama")}


def test_native_llama_reading_of_true_width_families():
    from internvl_tools.models.families import FAMILIES, identify

    for name, hint in (("InternVL2-2B", ""), ("InternVL2-26B", ""), ("InternVL3-9B-InternLM3", "OpenGVLab/InternVL3-9B-InternLM3")):
        family = FAMILIES[name]
        args = (family.vision.norm_type, "llama", family.ps_version, family.llm.hidden_size, family.template, hint,
                family.llm.num_hidden_layers)
        assert identify(*args, native=True) == name
        assert identify(*args) != name  # without `native`, Llama means a Llama LLM
    # InternVL3-9B (InternLM2) and -InternLM3 share ViT, template, width and depth: without a name, both are named
    nine = FAMILIES["InternVL3-9B"]
    assert identify(nine.vision.norm_type, "llama", nine.ps_version, nine.llm.hidden_size, nine.template, "",
                    nine.llm.num_hidden_layers, native=True) == "InternVL3-9B / InternVL3-9B-InternLM3"
    llama = FAMILIES["InternVL2-Llama3-76B"]  # a real Llama family is still itself
    assert identify(llama.vision.norm_type, "llama", llama.ps_version, llama.llm.hidden_size, llama.template, "",
                    llama.llm.num_hidden_layers, native=True) == "InternVL2-Llama3-76B"


def test_compressed_tensors_scheme_is_reported():
    """inspect's quantization line for compressed-tensors: the weights' bits, strategy, group size and
    symmetry from config_groups (W4A16 / W8A16 as quantize writes them), activations for W8A8, and
    per group when groups differ (which the reader refuses today)."""
    from internvl_tools.evaluate.inspect import quantization_facts
    from internvl_tools.formats import compressed_tensors as ct, detect, get_format

    def facts(quant):
        return quantization_facts(detect({"quantization_config": quant}), quant)

    base = {"format": "compressed_tensors", "quant_method": "compressed-tensors"}
    assert facts(ct.quantization_config(["mlp1"], bits=4, group_size=128)) == \
        {**base, "bits": 4, "strategy": "group", "group_size": 128, "symmetric": True}
    assert facts(ct.quantization_config(["mlp1"])) == {**base, "bits": 8, "strategy": "channel", "symmetric": True}
    assert facts(ct.w8a8_quantization_config(["mlp1"])) == {
        **base, "format": "compressed_tensors_int8", "bits": 8, "strategy": "channel", "symmetric": True,
        "activation_bits": 8, "activation_strategy": "token dynamic"}
    mixed = ct.quantization_config(["mlp1"], bits=4, group_size=128)
    mixed["config_groups"]["group_1"] = dict(mixed["config_groups"]["group_0"],
                                             weights=dict(mixed["config_groups"]["group_0"]["weights"], num_bits=8))
    assert quantization_facts(get_format("compressed_tensors"), mixed)["config_groups"] == {"group_0": "bits=4 strategy=group group_size=128 symmetric=True",
                                             "group_1": "bits=8 strategy=group group_size=128 symmetric=True"}
