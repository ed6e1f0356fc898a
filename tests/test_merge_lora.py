"""`merge-lora`: embedded InternVL LoRA and PEFT adapters merged tensor by tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_tools.io.reader import CheckpointReader
from internvl_tools.models.views import open_view
from internvl_tools.tiny.generator import make_peft_adapter

from . import reference_internvl as ref
from .conftest import ALL_FAMILIES, NEW_DIALECTS
from .support import all_tensors


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor, key: str):
    """Equal up to the last bf16 bit (blocked float32 sums may round the other way)."""
    assert got.dtype == want.dtype == torch.bfloat16, key
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6, msg=key)
    assert (got == want).float().mean() > 0.98, key


def _reference_merge(src: dict, alpha_of_rank=lambda r: 2 * r) -> dict:
    """Independent float32 merge of embedded LoRA: W + (alpha / r) B A, keys unwrapped."""
    out = {}
    for key, tensor in src.items():
        if ".lora_" in key:
            continue
        plain = key.replace("language_model.base_model.model.", "language_model.").replace("vision_model.base_model.model.", "vision_model.")
        plain = plain.replace(".base_layer.", ".")
        stem = key.removesuffix(".weight").removesuffix(".base_layer")
        a, b = src.get(stem + ".lora_A.default.weight"), src.get(stem + ".lora_B.default.weight")
        if a is not None and key.endswith(".base_layer.weight"):
            rank = a.shape[0]
            tensor = (tensor.float() + alpha_of_rank(rank) / rank * (b.float() @ a.float())).to(tensor.dtype)
        out[plain] = tensor
    return out


EMBEDDED = [(family, lora) for lora in ("embedded", "embedded-llm", "embedded-vision") for family in ALL_FAMILIES]


@pytest.mark.parametrize("family,lora", EMBEDDED + [(family, "embedded") for family in NEW_DIALECTS])
def test_embedded_lora_merge_matches_float32_reference(family, lora, tiny, tmp_path, run_cli):
    src_dir = tiny(family, lora=lora)
    out = tmp_path / "merged"
    result = run_cli("merge-lora", src_dir, "-o", out, "--max-shard-size", "100KB", "--json")
    assert result.exit_code == 0, result.output
    merged, expected = all_tensors(out), _reference_merge(all_tensors(src_dir))
    assert set(merged) == set(expected) == set(all_tensors(tiny(family)))  # the plain layout's keys
    changed = 0
    for key, want in expected.items():
        _assert_bf16_close(merged[key], want, key)
        changed += not torch.equal(merged[key], all_tensors(tiny(family))[key])
    assert changed >= (8 if "vision" in lora else 12)
    config = json.loads((out / "config.json").read_text())
    assert config["use_llm_lora"] == 0 and config["use_backbone_lora"] == 0
    assert (out / "tokenizer.json").read_bytes() == (src_dir / "tokenizer.json").read_bytes()
    report = json.loads(run_cli("inspect", out, "--json").output)
    assert report["lora"] == {}


def test_merged_forward_equals_lora_forward(tiny, tmp_path, run_cli):
    """The merged checkpoint (runtime) computes what the unmerged LoRA model computes."""
    from internvl_tools.runtime.model import InternVLRuntime

    from .support import sample_image

    src_dir = tiny("InternVL2-Llama3-76B", lora="embedded")
    out = tmp_path / "m"
    assert run_cli("merge-lora", src_dir, "-o", out).exit_code == 0
    runtime = InternVLRuntime(out)
    pixels = runtime.pixel_values(sample_image(6))
    ids = runtime.prompt_ids("Describe the image.", pixels.shape[0])
    # the LoRA model in float32, W + 2 B A never rounded to bf16
    config, sd = ref.load_state(src_dir)
    lora_sd = {k: v for k, v in _reference_merge({k: v for k, v in sd.items()}).items()}
    context = runtime.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    features = ref.image_features(config, lora_sd, pixels)
    want = ref.llm_logits(config, lora_sd, ref.embed(config, lora_sd, ids, features, context))
    got = runtime.logits(ids, pixels)
    assert (got - want).norm() / want.norm() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("family", ["InternVL2-1B", "InternVL2-4B", "InternVL2-40B", "InternVL2-2B"])
def test_peft_adapter_on_bare_llm(family, tiny, tmp_path, run_cli):
    adapter = make_peft_adapter(tiny(family), tmp_path / "adapter", rank=4, alpha=16)
    out = tmp_path / "merged"
    result = run_cli("merge-lora", tiny(family), "--adapter", adapter, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    base, merged, factors = all_tensors(tiny(family)), all_tensors(out), load_file(adapter / "adapter_model.safetensors")
    touched = 0
    for key, tensor in base.items():
        stem = "base_model.model." + key.removeprefix("language_model.").removesuffix(".weight")
        if stem + ".lora_A.weight" in factors:
            a, b = factors[stem + ".lora_A.weight"], factors[stem + ".lora_B.weight"]
            want = (tensor.float() + 16 / 4 * (b @ a)).to(tensor.dtype)
            _assert_bf16_close(merged[key], want, key)
            touched += 1
        else:
            assert torch.equal(merged[key], tensor), key
    assert touched == len(factors) // 2 > 0


@pytest.mark.requires("peft")
@pytest.mark.parametrize("family", ["InternVL2-40B", "InternVL2-1B", "InternVL2-4B"])
def test_peft_merge_and_unload_agrees(family, tiny, tmp_path, run_cli):
    """peft's own merge_and_unload on the LLM (runtime-built native modules) gives the same weights."""
    import peft

    from internvl_tools.models.layout import build_layout
    from internvl_tools.runtime.build import build_llm

    adapter = make_peft_adapter(tiny(family), tmp_path / "adapter", rank=4, alpha=8,
                                extra_config={"use_rslora": True, "alpha_pattern": {"down_proj": 32}})
    out = tmp_path / "merged"
    assert run_cli("merge-lora", tiny(family), "--adapter", adapter, "-o", out).exit_code == 0
    with CheckpointReader(tiny(family)) as reader:
        config = reader.config()
        llm = build_llm(reader, config, build_layout(config, reader.specs()), torch.bfloat16)
    merged_by_peft = peft.PeftModel.from_pretrained(llm, str(adapter)).merge_and_unload().state_dict()
    ours = all_tensors(out)
    compared = 0
    for name, tensor in merged_by_peft.items():
        key = "language_model." + name
        if key in ours and tensor.dim() == 2:
            _assert_bf16_close(ours[key], tensor, key)
            compared += 1
    assert compared > 10


def test_adapter_options(tiny, tmp_path, run_cli):
    """modules_to_save, two adapters in order, whole-model keys with the vision tower, .bin weights."""
    family = "InternVL2-26B"
    first = make_peft_adapter(tiny(family), tmp_path / "a1", rank=2, alpha=4, bare_llm=False, vision=True)
    second = make_peft_adapter(tiny(family), tmp_path / "a2", rank=3, alpha=3, seed=7, targets=["attention.wo"])
    tensors = load_file(second / "adapter_model.safetensors")
    head = torch.randn(all_tensors(tiny(family))["language_model.output.weight"].shape)
    tensors["base_model.model.output.weight"] = head  # modules_to_save: a full replacement
    (second / "adapter_model.safetensors").unlink()
    torch.save(tensors, second / "adapter_model.bin")
    out = tmp_path / "m"
    result = run_cli("merge-lora", tiny(family), "--adapter", first, "--adapter", second, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["replaced"] == 1 and set(summary["towers"]) == {"language_model", "vision_model"}
    base, merged = all_tensors(tiny(family)), all_tensors(out)
    f1 = load_file(first / "adapter_model.safetensors")
    key = "language_model.model.layers.1.attention.wo.weight"
    d1 = 2 * (f1["base_model.model." + key[:-7] + ".lora_B.weight"] @ f1["base_model.model." + key[:-7] + ".lora_A.weight"])
    d2 = 1 * (tensors["base_model.model." + key[15:-7] + ".lora_B.weight"] @ tensors["base_model.model." + key[15:-7] + ".lora_A.weight"])
    _assert_bf16_close(merged[key], (base[key].float() + d1 + d2).to(torch.bfloat16), key)
    assert torch.equal(merged["language_model.output.weight"], head.to(torch.bfloat16))
    vkey = "vision_model.encoder.layers.0.attn.qkv.weight"
    assert not torch.equal(merged[vkey], base[vkey])


def _expect_refused(run_cli, tmp_path, args, *needles):
    out = tmp_path / "never"
    result = run_cli("merge-lora", *args, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    for needle in needles:
        assert needle in result.output
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_bad_adapters_refused(tiny, tmp_path, run_cli):
    base = tiny("InternVL2-40B")
    other = make_peft_adapter(tiny("InternVL-Chat-V1-1"), tmp_path / "other")  # MHA: k_proj shapes differ
    _expect_refused(run_cli, tmp_path, [base, "--adapter", other], "k_proj", "another model")
    missing = make_peft_adapter(base, tmp_path / "missing")
    tensors = load_file(missing / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(missing / "adapter_model.safetensors"))
    _expect_refused(run_cli, tmp_path, [base, "--adapter", missing], "layers.9.self_attn.q_proj", "no base weight")
    broken = make_peft_adapter(base, tmp_path / "broken")
    tensors = load_file(broken / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    _expect_refused(run_cli, tmp_path, [base, "--adapter", broken], "layers.2.mlp.up_proj", "NaN or Inf")
    huge = make_peft_adapter(base, tmp_path / "huge", alpha=1e10)  # finite factors, overflowing result
    tensors = load_file(huge / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][0, 0] = 1e35
    save_file(tensors, str(huge / "adapter_model.safetensors"))
    result = run_cli("merge-lora", base, "--adapter", huge, "-o", tmp_path / "never")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: merging LoRA into")
    assert "NaN or Inf" in result.output and not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
    noconfig = make_peft_adapter(base, tmp_path / "noconfig")
    (noconfig / "adapter_config.json").unlink()
    _expect_refused(run_cli, tmp_path, [base, "--adapter", noconfig], "adapter_config.json")
    dora = make_peft_adapter(base, tmp_path / "dora", extra_config={"use_dora": True})
    _expect_refused(run_cli, tmp_path, [base, "--adapter", dora], "DoRA")
    _expect_refused(run_cli, tmp_path, [base], "nothing to merge")


def test_input_untouched_and_truncated_adapter(tiny, copy_of, tmp_path, run_cli):
    src = copy_of(tiny("InternVL2-1B", lora="embedded"))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert run_cli("merge-lora", src, "-o", tmp_path / "ok").exit_code == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    adapter = make_peft_adapter(tiny("InternVL2-1B"), tmp_path / "trunc")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:-64])
    _expect_refused(run_cli, tmp_path, [tiny("InternVL2-1B"), "--adapter", adapter], "adapter_model.safetensors", "truncated")


def test_dry_run_lists_merges_and_refusals_and_writes_nothing(tiny, tmp_path, run_cli):
    base = tiny("InternVL2-2B")
    good = make_peft_adapter(base, tmp_path / "good", rank=4, alpha=16, extra_config={"alpha_pattern": {"wo": 2}})
    bad = make_peft_adapter(base, tmp_path / "bad", extra_config={"init_lora_weights": "corda"})
    before = set(tmp_path.iterdir())
    result = run_cli("merge-lora", base, "--adapter", good, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dry_run"] and not report["refused"] and report["layout"] == "original"
    rows = {row["base_key"]: row for row in report["merges"]}
    wo = rows["language_model.model.layers.0.attention.wo.weight"]
    assert (wo["rank"], wo["alpha"], wo["scale"], wo["kind"]) == (4, 2, 0.5, "lora") and wo["source"] == str(good)
    assert rows["language_model.model.layers.2.feed_forward.w1.weight"]["scale"] == 4
    assert len(rows) == 15
    result = run_cli("merge-lora", base, "--adapter", good, "--adapter", bad, "--dry-run")
    assert result.exit_code == 2
    assert "refused:" in result.output and "corda" in result.output and "path_initial_model_for_weight_conversion" in result.output
    assert "feed_forward.w1" in result.output and "0..2 (3)" in result.output  # grouped over layers
    assert set(tmp_path.iterdir()) == before
    assert run_cli("merge-lora", base, "--adapter", good).exit_code == 2  # -o is required without --dry-run


def test_native_adapter_into_both_layouts_and_fused_rows(tiny, tmp_path, run_cli):
    """A LoRA on the native q_proj of InternLM2 (split from the fused wqkv) lands on wqkv's q rows only."""
    base = tiny("InternVL2-2B")
    native = tmp_path / "hf"
    assert run_cli("convert", base, "-o", native).exit_code == 0
    adapter = tmp_path / "native-adapter"
    adapter.mkdir()
    a, b = torch.randn(2, 64) * 0.1, torch.randn(64, 2) * 0.1
    save_file({"base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight": b}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    for source, out in ((base, tmp_path / "into-original"), (native, tmp_path / "into-native")):
        result = run_cli("merge-lora", source, "--adapter", adapter, "-o", out, "--json")
        assert result.exit_code == 0, result.output
    merged = all_tensors(tmp_path / "into-native")
    want = (all_tensors(native)["model.language_model.layers.1.self_attn.q_proj.weight"].float() + 2 * (b @ a)).to(torch.bfloat16)
    _assert_bf16_close(merged["model.language_model.layers.1.self_attn.q_proj.weight"], want, "q_proj")
    for name in ("k_proj", "v_proj"):
        key = f"model.language_model.layers.1.self_attn.{name}.weight"
        assert torch.equal(merged[key], all_tensors(native)[key])
    original = all_tensors(tmp_path / "into-original")
    with open_view(tmp_path / "into-native") as view:
        assert torch.equal(view.get("language_model.model.layers.1.attention.wqkv.weight"),
                           original["language_model.model.layers.1.attention.wqkv.weight"])


def test_lora_flags_that_disagree_with_the_tensors(tiny, copy_of, tmp_path, run_cli):
    """use_llm_lora set without LoRA tensors (and LoRA tensors with the flags 0): inspect reports it, every
    merge-lora output has both flags 0, with a warning line."""
    stale = copy_of(tiny("InternVL2-1B"))
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**config, "use_llm_lora": 8}))
    report = json.loads(run_cli("inspect", stale, "--json").output)
    assert report["lora"] == {} and any("use_llm_lora = 8" in m for m in report["lora_flags"])
    assert "LoRA flag mismatch" in run_cli("inspect", stale).output
    assert json.loads(run_cli("inspect", tiny("InternVL2-1B"), "--json").output)["lora_flags"] == []
    adapter = make_peft_adapter(tiny("InternVL2-1B"), tmp_path / "adapter")
    result = run_cli("merge-lora", stale, "--adapter", adapter, "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "warning: config.json sets use_llm_lora = 8" in result.output and "corrected" in result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["use_llm_lora"] == 0
    # the native layout keeps the original config in its sidecar: corrected there
    native = tmp_path / "hf"
    converted = run_cli("convert", stale, "-o", native)
    assert converted.exit_code == 0 and "use_llm_lora: 8 but there are no LoRA tensors" in converted.output
    sidecar = json.loads((native / "internvl_original.json").read_text())
    assert sidecar["config"]["use_llm_lora"] == 0  # convert corrects it too
    sidecar["config"]["use_llm_lora"] = 8  # a stale sidecar, as an older converter left it
    (native / "internvl_original.json").write_text(json.dumps(sidecar))
    result = run_cli("merge-lora", native, "--adapter", adapter, "-o", tmp_path / "m-hf", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["warnings"]
    assert not json.loads((tmp_path / "m-hf" / "internvl_original.json").read_text())["config"].get("use_llm_lora")
    assert json.loads(run_cli("inspect", tmp_path / "m-hf", "--json").output)["lora_flags"] == []
    # embedded LoRA tensors with the flags 0
    unflagged = copy_of(tiny("InternVL2-1B", lora="embedded"))
    (unflagged / "config.json").write_text(json.dumps({**json.loads((unflagged / "config.json").read_text()),
                                                       "use_llm_lora": 0, "use_backbone_lora": 0}))
    assert len(json.loads(run_cli("inspect", unflagged, "--json").output)["lora_flags"]) == 2
    result = run_cli("merge-lora", unflagged, "-o", tmp_path / "m2", "--json")
    assert result.exit_code == 0 and len(json.loads(result.output)["warnings"]) == 2


def test_adapter_errors_name_the_adapter_folder(tiny, tmp_path, run_cli):
    """A refusal of the adapter folder itself starts with that folder (never "error: : ")."""
    base = tiny("InternVL2-1B")
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    bad_json = make_peft_adapter(base, tmp_path / "list-config")
    (bad_json / "adapter_config.json").write_text("[1]")
    for adapter, needle in ((empty, "no adapter_config.json"), (bad_json, "adapter_config.json: expected a JSON object"),
                            (tmp_path / "nowhere", "no such adapter folder"),
                            (bad_json / "adapter_config.json", "no such adapter folder (a file: pass the folder that holds it)")):
        _expect_refused(run_cli, tmp_path, [base, "--adapter", adapter], needle)
        result = run_cli("merge-lora", base, "--adapter", adapter, "-o", tmp_path / "never")
        assert result.output.startswith(f"error: {adapter}") and "error: :" not in result.output, result.output
    dry = json.loads(run_cli("merge-lora", base, "--adapter", empty, "--dry-run", "--json").output)
    assert dry["refused"][0]["source"] == str(empty)


@pytest.mark.parametrize("method", ["int8", "gptq"])
def test_lora_into_a_quantized_base_says_merge_before_quantizing(tiny, tmp_path, run_cli, method):
    base = tiny("InternVL2-1B")
    adapter = make_peft_adapter(base, tmp_path / "adapter")
    quantized = tmp_path / "q"
    extra = ["--num-samples", "2", "--seq-len", "32", "--group-size", "32"] if method == "gptq" else []
    assert run_cli("quantize", base, "-o", quantized, "--method", method, *extra).exit_code == 0
    fmt = {"int8": "bnb_int8", "gptq": "gptq"}[method]
    _expect_refused(run_cli, tmp_path, [quantized, "--adapter", adapter], f"quantized ({fmt})", "merge-lora on the unquantized")
    result = run_cli("merge-lora", quantized, "--adapter", adapter, "-o", tmp_path / "never")
    assert "no base weight" not in result.output


def test_alpha_without_embedded_lora_is_refused(tiny, tmp_path, run_cli):
    """--alpha is the embedded LoRA's; a PEFT adapter's own lora_alpha is what peft uses."""
    base = tiny("InternVL2-1B")
    adapter = make_peft_adapter(base, tmp_path / "adapter")
    _expect_refused(run_cli, tmp_path, [base, "--adapter", adapter, "--alpha", "16"], "--alpha", "lora_alpha")
    assert run_cli("merge-lora", tiny("InternVL2-1B", lora="embedded"), "--alpha", "16", "-o", tmp_path / "ok").exit_code == 0


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_adapter_file_symlinked_outside_its_folder_needs_follow_symlinks(tiny, tmp_path, run_cli, name):
    """As a checkpoint's shards and side files: a link to outside the adapter folder is refused naming it."""
    base = tiny("InternVL2-1B")
    adapter = make_peft_adapter(base, tmp_path / "adapter")
    elsewhere = tmp_path / f"elsewhere-{name}"
    (adapter / name).rename(elsewhere)
    (adapter / name).symlink_to(elsewhere)
    _expect_refused(run_cli, tmp_path, [base, "--adapter", adapter], f"{adapter / name}", "outside the adapter folder",
                    "--follow-symlinks")
    assert run_cli("--follow-symlinks", "merge-lora", base, "--adapter", adapter, "-o", tmp_path / "ok").exit_code == 0
    inside = make_peft_adapter(base, tmp_path / "inside")  # a link within the folder is fine
    (inside / name).rename(inside / f"real-{name}")
    (inside / name).symlink_to(inside / f"real-{name}")
    assert run_cli("merge-lora", base, "--adapter", inside, "-o", tmp_path / "ok2").exit_code == 0


def test_nonfinite_scan_in_windows_matches_isfinite_per_tensor(tmp_path, monkeypatch):
    """TensorSources.nonfinite reads an adapter in windows (several tensors per read, gaps
    skipped or read, a tensor larger than the window on its own): the same answer as
    torch.isfinite(tensor).all() per tensor, whatever the window size."""
    from internvl_tools.transforms import merge_lora

    torch.manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(3 + i % 5, 7 + i % 3).to([torch.float32, torch.bfloat16, torch.float16][i % 3])
               for i in range(30)}
    tensors["big"] = torch.randn(64, 64)
    tensors["ints"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    tensors["t03"][1, 2] = float("nan")
    tensors["t17"][0, 0] = float("-inf")
    tensors["t29"][-1, -1] = float("inf")
    tensors["big"][63, 63] = float("nan")
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    expected = {name for name, t in tensors.items() if not torch.isfinite(t).all()}
    asked = [name for name in tensors if name not in ("t05", "t06", "t20")] + ["t03"]  # gaps, a repeat
    for window, gap in [(16 << 20, 1 << 20), (4096, 0), (600, 64), (1, 0)]:
        monkeypatch.setattr(merge_lora, "CHECK_WINDOW", window)
        monkeypatch.setattr(merge_lora, "CHECK_GAP", gap)
        sources = merge_lora.TensorSources(None)
        try:
            assert sources.nonfinite(str(path), asked) == expected - {"t05", "t06", "t20"}, (window, gap)
            assert sources.nonfinite(str(path), ["t00", "t01"]) == set()
        finally:
            sources.close()


def test_console_entry_point_exits_fast_with_output_and_status(tiny, tmp_path):
    """`python -m internvl_tools merge-lora` (main(): torch imported with the GC paused, the
    process ended by common.fast_exit) prints its JSON and exits 0, or prints the one-line
    error and exits 2; the merged checkpoint equals the CliRunner run's."""
    import subprocess
    import sys

    src = tiny("InternVL2-1B", lora="embedded")
    run = subprocess.run([sys.executable, "-m", "internvl_tools", "merge-lora", str(src), "-o", str(tmp_path / "out"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["merged_weights"] > 0
    expected = _reference_merge(all_tensors(src))
    merged = all_tensors(tmp_path / "out")
    assert set(merged) == set(expected)
    run = subprocess.run([sys.executable, "-m", "internvl_tools", "merge-lora", str(tmp_path / "missing"), "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
