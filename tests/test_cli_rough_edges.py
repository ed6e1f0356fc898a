"""The rough edges a newcomer hit (issue 19, item 7), each with the one-line answer it now gets."""

from __future__ import annotations

import pytest


def test_options_of_another_method_are_refused(tiny, tmp_path, run_cli):
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", "int8", "--bits", "8")
    assert result.exit_code == 2 and "--bits does not apply to --method int8" in result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method, flag", [("awq", "--asym"), ("awq", "--no-act-group-aware"), ("gptq", "--no-zero-point"),
                                          ("awq", "--sym")])
def test_an_option_of_another_method_is_named_as_typed(tiny, tmp_path, run_cli, method, flag):
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", method, flag)
    assert result.exit_code == 2 and result.output.startswith(f"error: {flag} does not apply to --method {method}"), result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_resume_on_a_complete_output_is_refused(tiny, tmp_path, run_cli):
    out = tmp_path / "g"
    args = ["quantize", tiny("InternVL2-1B"), "-o", out, "--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "32"]
    assert run_cli(*args).exit_code == 0
    again = run_cli(*args, "--resume")
    assert again.exit_code == 2 and "already complete" in again.output and "--overwrite" in again.output


def test_a_shard_file_instead_of_the_folder(tiny, run_cli):
    shard = sorted(tiny("InternVL2-1B").glob("*.safetensors"))[0]
    for command in ("inspect", "chat"):
        args = [command, shard] + (["hi"] if command == "chat" else [])
        result = run_cli(*args)
        assert result.exit_code == 2 and "pass the checkpoint folder" in result.output, result.output


def test_export_of_a_tower_with_lora_says_merge_first(tiny, tmp_path, run_cli):
    pytest.importorskip("onnx")
    result = run_cli("export", tiny("InternVL2-1B", lora="embedded-vision"), "-o", tmp_path / "e")
    assert result.exit_code == 2 and "merge-lora" in result.output and "no vision tower" not in result.output


def test_every_command_documents_json(run_cli):
    from internvl_tools.cli.main import cli

    for name, command in cli.commands.items():
        option = next((p for p in command.params if "--json" in getattr(p, "opts", [])), None)
        if option is not None:
            assert option.help, f"{name} --json has no help text"


def test_gpu_plan_shows_layer_counts():
    from internvl_tools.cli.gpu_plan import _ranges

    assert _ranges((0,)) == "1 (#0)" and _ranges((0, 1, 2)) == "3 (0-2)" and _ranges(()) == "none"


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_every_command_refuses_a_file_for_the_checkpoint_folder(tiny, tmp_path, run_cli):
    """One shared check: a shard (or config.json) in place of the folder, never "Not a directory"."""
    folder = tiny("InternVL2-1B")
    shard = sorted(folder.glob("*.safetensors"))[0]
    bench = tmp_path / "slice.jsonl"
    bench.write_text('{"question": "Is it red?", "answer": "yes"}\n')
    for args in (["convert", shard, "-o", tmp_path / "c"], ["quantize", shard, "-o", tmp_path / "q", "--method", "int8"],
                 ["shard", shard, "-o", tmp_path / "s"], ["merge-lora", shard, "-o", tmp_path / "m"],
                 ["export", shard, "-o", tmp_path / "e"], ["verify", folder, shard, "--bench", bench],
                 ["inspect", folder / "config.json"]):
        line = _one_line_error(run_cli(*args))
        assert "pass the checkpoint folder" in line and "Not a directory" not in line, (args[0], line)


def test_an_unknown_architecture_names_the_config_file(tiny, copy_of, tmp_path, run_cli):
    import json

    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    for args in (["inspect", folder], ["convert", folder, "-o", tmp_path / "c"], ["shard", folder, "-o", tmp_path / "s"]):
        line = _one_line_error(run_cli(*args))
        assert f"{folder}/config.json: llm_config.architectures" in line and "FooForCausalLM" in line, line


@pytest.mark.parametrize("command", ["inspect", "shard"])
@pytest.mark.parametrize("option", [["--gpu-memory", "40GiB"], ["--context", "4096"], ["--reserve", "1GiB"], ["--batch", "2"]])
def test_gpu_plan_options_without_gpus_are_refused(tiny, tmp_path, run_cli, command, option):
    args = [command, tiny("InternVL2-1B"), *option] + (["-o", tmp_path / "s"] if command == "shard" else [])
    line = _one_line_error(run_cli(*args))
    assert option[0] in line and "--gpus" in line
    assert not (tmp_path / "s").exists()


def test_a_zero_reserve_is_accepted(tiny, run_cli):
    import json

    result = run_cli("inspect", tiny("InternVL2-1B"), "--gpus", "2", "--reserve", "0GiB", "--json")
    assert result.exit_code == 0, result.output
    assert all(g["reserve_bytes"] == 0 for g in json.loads(result.output)["gpu_plan"]["gpus"])


@pytest.mark.parametrize("option", [["--opt-batch", "2"], ["--workspace", "8"]])
def test_tensorrt_options_with_onnx_are_refused(tiny, tmp_path, run_cli, option):
    line = _one_line_error(run_cli("export", tiny("InternVL2-1B"), "-o", tmp_path / "e", *option))
    assert option[0] in line and "--format tensorrt" in line
    assert not (tmp_path / "e").exists()


def test_int8_with_a_gptq_recipe_is_refused(tiny, tmp_path, run_cli):
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "internvl-chat-v1-2-gptq-w4g128.yaml"
    line = _one_line_error(run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", "int8", "--recipe", recipe))
    assert "--method int8" in line and "method: gptq" in line
    no_method = tmp_path / "bits.yaml"
    no_method.write_text("bits: 4\ngroup_size: 32\n")
    line = _one_line_error(run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", "int8", "--recipe", no_method))
    assert "--bits" in line and "recipe" in line and "--method int8" in line
    assert not (tmp_path / "q").exists()


def test_chat_with_a_missing_image_is_a_one_line_error(tiny, tmp_path, run_cli):
    """--image that does not exist (or is a folder): the one-line `error:` (exit 2), not click's usage error."""
    for image, needle in ((tmp_path / "nonexistent.png", "no such file"), (tmp_path, "a folder")):
        line = _one_line_error(run_cli("chat", tiny("InternVL2-1B"), "hi", "--image", image))
        assert str(image) in line and needle in line and "--image takes an image file" in line


@pytest.mark.parametrize("out", [".", "", ".."])
@pytest.mark.parametrize("command", ["convert", "shard", "quantize", "merge-lora", "export", "make-tiny"])
def test_an_output_without_a_folder_name_is_one_line(tiny, tmp_path, run_cli, monkeypatch, command, out):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if command == "make-tiny":
        args = ["make-tiny", "internvl2-1b", out]
    else:
        args = [command, tiny("InternVL2-1B"), "-o", out] + (["--method", "int8"] if command == "quantize" else [])
    result = run_cli(*args)
    line = result.output.strip()
    assert result.exit_code == 2 and "\n" not in line and "names no folder" in line, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind (no *.partial)


@pytest.mark.parametrize("args, words", [
    (["quantize", "-o", "{out}", "--method", "gptq", "--num-samples", "0"], "--num-samples"),
    (["quantize", "-o", "{out}", "--method", "gptq", "--seq-len", "0"], "--seq-len"),
    (["quantize", "-o", "{out}", "--method", "gptq", "--group-size", "0"], "--group-size"),
    (["quantize", "-o", "{out}", "--method", "gptq", "--group-size", "-2"], "--group-size"),
    (["quantize", "-o", "{out}", "--method", "gptq", "--damp", "0"], "--damp"),
    (["quantize", "-o", "{out}", "--method", "gptq", "--damp", "-0.1"], "--damp"),
    (["quantize", "-o", "{out}", "--method", "int8", "--only", "("], "--only"),
    (["quantize", "-o", "{out}", "--method", "int8", "--skip", "[a"], "--skip"),
    (["chat", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["verify", "{ckpt}", "--bench", "{out}.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["verify", "{ckpt}", "--bench", "{out}.jsonl", "--max-kl", "-1"], "--max-kl"),
    (["merge-lora", "-o", "{out}", "--alpha", "0"], "--alpha"),
    (["merge-lora", "-o", "{out}", "--alpha", "-2"], "--alpha"),
])
def test_out_of_range_values_are_refused_at_parse_time(tiny, tmp_path, run_cli, args, words):
    ckpt, out = tiny("InternVL2-1B"), tmp_path / "out"
    args = [a.format(out=out, ckpt=ckpt) for a in args]
    result = run_cli(args[0], ckpt, *args[1:])
    line = result.output.strip()
    assert result.exit_code == 2 and "\n" not in line and words in line, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--lora", "embedded", "--rank", "-1"], ["--lora", "embedded", "--rank", "0"],
                                   ["--shards", "0"]])
def test_make_tiny_refuses_out_of_range_counts(tmp_path, run_cli, extra):
    result = run_cli("make-tiny", "internvl2-1b", tmp_path / "t", *extra)
    assert result.exit_code == 2 and "\n" not in result.output.strip(), result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line", ["bits: 5", "group_size: 0", "damp: 0", "num_samples: 0"])
def test_recipe_values_get_the_same_checks_as_the_options(tiny, tmp_path, run_cli, line):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: gptq\n{line}\n")
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--recipe", recipe)
    key = line.split(":")[0]
    assert result.exit_code == 2 and str(recipe) in result.output and key in result.output, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_group_size_that_does_not_divide_every_linear_names_one_that_does(tiny, tmp_path, run_cli, method):
    """Tiny linears are 64 wide: group 128 would give a GPTQ file transformers + gptqmodel refuse
    ("in_features 64 must be divisible by group_size 128"); the hint must work for every linear."""
    out = tmp_path / "q"
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", out, "--method", method, "--num-samples", "2", "--seq-len", "16")
    line = result.output.strip()
    assert result.exit_code == 2 and "\n" not in line and "--group-size 128" in line and "--group-size 32 divides every" in line
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("text, where", [("method: gptq\nbits: [4\n", "line 3"), ("a: b: c\n", "line 1")])
def test_broken_recipe_yaml_is_one_line(text, where, tiny, tmp_path, run_cli):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(text)
    line = _one_line_error(run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--recipe", recipe))
    assert "broken.yaml" in line and "not valid YAML" in line and where in line


def test_chat_without_a_tokenizer_is_one_line(tiny, tmp_path, run_cli):
    import shutil

    folder = tmp_path / "notok"
    shutil.copytree(tiny("InternVL2-1B"), folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"):
        (folder / name).unlink(missing_ok=True)
    line = _one_line_error(run_cli("chat", folder, "hi"))
    assert str(folder) in line and "tokenizer" in line


def test_vllm_engine_names_known_causes_before_vllm_starts(tiny, tmp_path, run_cli):
    """verify --engine vllm: an original layout without remote code, a bitsandbytes candidate and a
    head_dim vLLM's CPU attention lacks are refused in one line with the fix, before vLLM runs
    (vLLM's own text for these is a pydantic dump or a list of 30 methods)."""
    from internvl_tools.evaluate.vllm_engine import refusal
    from internvl_tools.runtime.model import open_for_runtime

    original = tiny("InternVL2-1B")  # head_dim 16, no remote code
    native = tmp_path / "hf"
    assert run_cli("convert", original, "-o", native, "--to", "hf").exit_code == 0
    bnb = tmp_path / "bnb"
    assert run_cli("quantize", native, "-o", bnb, "--method", "int8").exit_code == 0

    def why(folder):
        with open_for_runtime(folder) as view:
            return refusal(folder, view.config())

    assert "convert" in why(original) and "--to hf" in why(original)
    assert "--format w8a8" in why(bnb)
    assert "head_dim 16" in why(native) and "--head-dim 32" in why(native)
    for line in (why(original), why(bnb), why(native)):
        assert "\n" not in line


def _damage(folder, key_part: str, value: float, where=(0, 0)) -> str:
    """Set one element of the first tensor whose key holds `key_part` (in place, in a private copy); its key."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        key = next((k for k in tensors if key_part in k), None)
        if key is not None:
            tensors[key][where] = value
            save_file(tensors, shard, metadata={"format": "pt"})
            return key
    raise AssertionError(key_part)


@pytest.mark.parametrize("fmt", ["bnb", "compressed-tensors", "w8a8"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_int8_refuses_a_weight_holding_nan_or_inf(tiny, copy_of, tmp_path, run_cli, fmt, value):
    """A NaN/Inf in a quantized weight makes its row absmax (the scale) NaN/Inf: refused naming the tensor
    and the row, nothing published (the partial folder is removed)."""
    folder = copy_of(tiny("InternVL2-1B"))
    key = _damage(folder, "layers.0.mlp.down_proj.weight", value, (3, 5))
    out = tmp_path / "q"
    line = _one_line_error(run_cli("quantize", folder, "-o", out, "--method", "int8", "--format", fmt))
    assert key in line and "row 3" in line and "NaN or Inf" in line and "--skip" in line, line
    assert not out.exists() and not (tmp_path / "q.partial").exists()


def test_int8_bnb_names_values_beyond_float16(tiny, copy_of, tmp_path, run_cli):
    """bitsandbytes' float16 pass turns a bf16 value above 65504 into Inf: refused, with the formats that take it."""
    folder = copy_of(tiny("InternVL2-1B"))
    key = _damage(folder, "layers.0.mlp.down_proj.weight", 1e6)
    out = tmp_path / "q"
    line = _one_line_error(run_cli("quantize", folder, "-o", out, "--method", "int8"))
    assert key in line and "float16's range" in line and "--format w8a8" in line, line
    assert not out.exists() and not (tmp_path / "q.partial").exists()
    assert run_cli("quantize", folder, "-o", out, "--method", "int8", "--format", "w8a8").exit_code == 0


@pytest.mark.parametrize("extra, words", [(["--rank", "8"], "--rank"), (["--lora", "none", "--rank", "8"], "--rank"),
                                          (["--shards", "1000"], "--shards 77 at most"), (["--llm-layers", "6"], "add --wide")])
def test_make_tiny_refuses_options_that_do_not_apply(tmp_path, run_cli, extra, words):
    """--rank without --lora and --llm-layers without --wide would be dropped silently; more shards
    than tensors cannot be made."""
    line = _one_line_error(run_cli("make-tiny", "internvl2-1b", tmp_path / "t", *extra))
    assert words in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shards", [9, 10, 19, 77])
def test_make_tiny_writes_the_shard_count_asked(tmp_path, run_cli, shards):
    """Up to one tensor per shard; counts no size limit gives (10 or 19 for this family) too."""
    import json

    result = run_cli("make-tiny", "internvl2-1b", tmp_path / "t", "--shards", shards, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"] == shards == len(list((tmp_path / "t").glob("*.safetensors")))
    assert run_cli("inspect", tmp_path / "t").exit_code == 0


@pytest.mark.parametrize("option", ["--context", "--batch"])
def test_gpu_plan_refuses_zero_context_or_batch(tiny, tmp_path, run_cli, option):
    for command in ("shard", "inspect"):
        args = [command, tiny("InternVL2-1B"), "--gpus", "2", option, "0"] + (["-o", tmp_path / "s"] if command == "shard" else [])
        line = _one_line_error(run_cli(*args))
        assert option in line and "x>=1" in line, line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, needle", [
    (["quantizee", "x"], "No such command 'quantizee'"),
    (["quantize", "--forward-dtype"], "Option '--forward-dtype' requires an argument. (see `internvl-tools quantize --help`)"),
    (["inspect", "--nope", "x"], "No such option '--nope'. (see `internvl-tools inspect --help`)"),
])
def test_usage_errors_are_one_line(args, needle):
    """Click's own usage errors (unknown command or option, a missing value) read as every other
    refusal: one `error:` line naming the command's --help, exit 2, no usage block."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "internvl_tools", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_os_errors_suggest_the_fix_of_their_kind():
    """A full disk says free space; a read-only or foreign folder says choose a writable one (it
    used to say 'free disk space' for every OSError); anything else says check the path."""
    import errno

    from internvl_tools.cli.common import os_error_hint

    assert "free disk space" in os_error_hint(OSError(errno.ENOSPC, "No space left on device"))
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        assert "folder you can write to" in os_error_hint(OSError(code, "x"))
    assert os_error_hint(OSError(errno.ENOENT, "No such file")) == "check the path"


def test_make_tiny_tells_its_total_before_writing(tmp_path):
    """The generator tells the bytes it will write before the first tensor (make-tiny --wide's bar
    showed 'N/0 bytes'); the progress adds up to that total."""
    from internvl_tools.tiny.generator import make_checkpoint

    totals, written = [], []
    make_checkpoint("InternVL2-1B", tmp_path / "t", planned_bytes=lambda n: totals.append((n, sum(written))),
                    progress=written.append)
    assert len(totals) == 1 and totals[0][1] == 0 and totals[0][0] == sum(written) > 0
