"""The rough edges a newcomer hit (issue 19, item 7), each with the one-line answer it now gets."""

from __future__ import annotations

import pytest


def test_options_of_another_method_are_refused(tiny, tmp_path, run_cli):
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", "int8", "--bits", "8")
    assert result.exit_code == 2 and "--bits does not apply to --method int8" in result.output
    assert not (tmp_path / "q").exists()


def test_resume_on_a_complete_output_is_refused(tiny, tmp_path, run_cli):
    out = tmp_path / "g"
    args = ["quantize", tiny("InternVL2-1B"), "-o", out, "--method", "gptq", "--num-samples", "2", "--seq-len", "32"]
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
