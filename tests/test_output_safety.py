"""Outputs that cannot lie and inputs that are what they claim (shards, links, indexes)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from internvl_tools.io.writer import OutputLock


def test_trailing_bytes_after_the_last_tensor_are_refused(tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    with open(shard, "ab") as handle:
        handle.write(b"\0" * 16)
    for command in (["inspect", folder], ["shard", folder, "-o", folder.parent / "out"]):
        result = run_cli(*command)
        assert result.exit_code == 2, result.output
        assert shard.name in result.output and "16 bytes after the last tensor" in result.output


def test_symlinked_shard_outside_the_folder_needs_follow_symlinks(tiny, copy_of, tmp_path, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)
    refused = run_cli("inspect", folder)
    assert refused.exit_code == 2 and "--follow-symlinks" in refused.output and shard.name in refused.output
    assert run_cli("--follow-symlinks", "inspect", folder).exit_code == 0
    assert run_cli("inspect", folder).exit_code == 2  # the flag holds for one run only


def test_hugging_face_cache_links_are_read(tiny, tmp_path, run_cli):
    """snapshots/<rev>/file -> ../../blobs/<hash>, as huggingface_hub downloads are laid out."""
    source = tiny("InternVL2-1B")
    snapshot, blobs = tmp_path / "models--x" / "snapshots" / "abc", tmp_path / "models--x" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, entry in enumerate(sorted(source.iterdir())):
        blob = blobs / f"blob{index}"
        blob.write_bytes(entry.read_bytes())
        (snapshot / entry.name).symlink_to(os.path.relpath(blob, snapshot))
    assert run_cli("inspect", snapshot).exit_code == 0


def test_a_second_run_into_a_locked_output_is_refused(tiny, tmp_path, run_cli):
    out = tmp_path / "out"
    with OutputLock(out):
        result = run_cli("shard", tiny("InternVL2-1B"), "-o", out, "--overwrite")
    assert result.exit_code == 2 and "another run is writing" in result.output
    assert not out.exists()
    assert run_cli("shard", tiny("InternVL2-1B"), "-o", out).exit_code == 0
    assert not (tmp_path / "out.lock").exists()


def test_concurrent_runs_never_both_succeed_over_an_incomplete_output(tiny, tmp_path):
    """Many processes race into one OUT: every success leaves a complete checkpoint."""
    import subprocess
    import sys

    out = tmp_path / "race"
    script = ("import sys; from internvl_tools.cli.main import main; sys.argv=['internvl-tools','shard',sys.argv[1],'-o',sys.argv[2],"
              "'--overwrite','--max-shard-size','100KB']; main()")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tiny("InternVL2-1B")), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [(p.wait(), p.stdout.read() + p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results)
    assert all(code in (0, 2) for code, _ in results), results
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    assert run_inspect_ok(out)


def run_inspect_ok(folder) -> bool:
    from internvl_tools.evaluate.inspect import summarize

    return summarize(folder)["tensors"] > 0


def test_leftover_partial_is_reported_when_replaced(tiny, tmp_path, run_cli):
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "junk").write_text("x")
    result = run_cli("shard", tiny("InternVL2-1B"), "-o", out)
    assert result.exit_code == 0
    assert "left by an interrupted run" in result.output


def test_full_disk_names_the_file_being_written(tiny, tmp_path, run_cli, monkeypatch):
    import errno

    import internvl_tools.io.writer as writer

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    source = tiny("InternVL2-1B")  # generated (written) before the disk is "full"
    monkeypatch.setattr(writer.os, "pwrite", full)
    result = run_cli("quantize", source, "-o", tmp_path / "q", "--method", "int8")
    assert result.exit_code == 2
    assert "q.partial/model" in result.output and "No space left on device" in result.output and "free disk space" in result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith("error: ")  # no bar, no blank line before it
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("where", ["side file", "json"])
def test_full_disk_after_the_weights_names_the_output_file(tiny, tmp_path, run_cli, monkeypatch, where):
    """A full disk while the side files are copied (shutil's error names the input first) or the
    config / index JSON is written (an error without a path) names the output file, not the input."""
    import errno
    import shutil
    from pathlib import Path

    real_copy, real_write = shutil.copy2, Path.write_text

    def full_copy(src, dst, **kwargs):
        if where == "side file" and ".partial" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real_copy(src, dst, **kwargs)

    def full_write(self, *args, **kwargs):
        if where == "json" and ".partial" in str(self) and self.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    source = tiny("InternVL2-1B")
    monkeypatch.setattr(shutil, "copy2", full_copy)
    monkeypatch.setattr(Path, "write_text", full_write)
    result = run_cli("convert", source, "-o", tmp_path / "c", "--to", "hf")
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'c.partial'}/") and "No space left on device; free disk space" in line, line
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_an_index_that_lists_none_of_a_shards_keys_names_the_shard(tiny, copy_of, run_cli):
    folder = copy_of(tiny("InternVL2-1B"))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    index_path.write_text(json.dumps(index))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2
    assert "model.safetensors.index.json" in result.output and last in result.output and "config.json" not in result.output


def _snapshot(folder):
    """Every file under `folder` with its bytes (to show that a refused run left inputs alone)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_verify_reports_never_overwrite_the_inputs(tiny, copy_of, tmp_path, run_cli):
    ref, cand = copy_of(tiny("InternVL2-1B")), tmp_path / "cand"
    shutil.copytree(ref, cand)
    bench = tmp_path / "slice.jsonl"
    bench.write_text('{"question": "Is it red?", "answer": "yes"}\n')
    before = _snapshot(ref), _snapshot(cand), bench.read_bytes()
    for option, path in (("--json", ref / "config.json"), ("--markdown", bench), ("--plot", cand / "report.png"),
                         ("--ref-cache", ref), ("--ref-cache", cand / "cache")):
        result = run_cli("verify", ref, cand, "--bench", bench, option, path)
        assert result.exit_code == 2, (option, result.output)
        line = result.output.strip()
        assert "\n" not in line and option in line and "inputs are never modified" in line, line
    assert (_snapshot(ref), _snapshot(cand), bench.read_bytes()) == before


def test_verify_reports_never_overwrite_the_slice_images_and_the_cache_never_holds_an_input(tiny, tmp_path, run_cli):
    """A .jsonl slice reads the images its rows name (any row, not just the first --limit); a
    report path that is one of them is refused, and --ref-cache must not be or contain an input."""
    ref = tiny("InternVL2-1B")
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(data / "a.png")
    Image.new("RGB", (8, 8), "blue").save(data / "b.png")
    bench = data / "b.jsonl"
    bench.write_text('{"image": "a.png", "question": "Red?", "answer": "yes"}\n'
                     '{"image": "b.png", "question": "Blue?", "answer": "yes"}\n')
    before = _snapshot(data)
    for option, path in (("--plot", data / "a.png"), ("--json", data / "b.png"), ("--markdown", bench),
                         ("--ref-cache", data), ("--ref-cache", tmp_path), ("--ref-cache", ref.parent)):
        result = run_cli("verify", ref, ref, "--bench", bench, "--limit", "1", option, path)
        assert result.exit_code == 2, (option, result.output)
        line = result.output.strip()
        assert "\n" not in line and option in line and "inputs are never modified" in line, line
    assert _snapshot(data) == before


def test_quantize_never_writes_into_its_calibration_data(tiny, tmp_path, run_cli):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "rows.jsonl").write_text('{"question": "What is shown?", "answer": "a cat"}\n')
    before = _snapshot(calib)
    for out, extra in ((calib / "out", []), (calib, ["--overwrite"]), (calib, ["--resume"]), (tmp_path, ["--overwrite"])):
        result = run_cli("quantize", tiny("InternVL2-1B"), "-o", out, "--method", "gptq", "--calib", calib, *extra)
        assert result.exit_code == 2, result.output
        assert "inputs are never modified" in result.output and str(calib) in result.output
    assert _snapshot(calib) == before


def test_an_output_whose_partial_folder_is_an_input_is_refused(tiny, tmp_path, run_cli):
    """`shard X.partial -o X` would clear X.partial (the input) as a leftover of an interrupted run."""
    source = tmp_path / "x.partial"
    shutil.copytree(tiny("InternVL2-1B"), source)
    result = run_cli("shard", source, "-o", tmp_path / "x")
    assert result.exit_code == 2 and "inputs are never modified" in result.output
    assert (source / "config.json").exists()


def test_make_tiny_does_not_write_over_an_existing_peft_adapter_folder(tmp_path, run_cli):
    adapter = tmp_path / "t-peft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    result = run_cli("make-tiny", "InternVL2-1B", tmp_path / "t", "--lora", "peft")
    assert result.exit_code == 2 and "t-peft-adapter" in result.output and "--overwrite" in result.output
    assert (adapter / "adapter_config.json").read_text() == "{}" and not (tmp_path / "t").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "configuration_internvl_chat.py"])
def test_symlinked_side_file_outside_the_folder_needs_follow_symlinks(tiny, copy_of, tmp_path, run_cli, name):
    folder = copy_of(tiny("InternVL2-1B"))
    side = folder / name
    if not side.exists():
        side.write_text("# remote code\n")
    elsewhere = tmp_path / ("elsewhere-" + name)
    side.rename(elsewhere)
    side.symlink_to(elsewhere)
    refused = run_cli("shard", folder, "-o", tmp_path / "out")
    assert refused.exit_code == 2 and "--follow-symlinks" in refused.output and name in refused.output, refused.output
    assert not (tmp_path / "out").exists()
    assert run_cli("--follow-symlinks", "shard", folder, "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / name).read_bytes() == elsewhere.read_bytes()


def test_bad_calibration_data_leaves_nothing_behind(tiny, tmp_path, run_cli):
    """A --calib file that cannot be read is refused before OUT.partial is made (fresh-user review:
    each bad run left OUT.partial/ with a copied model.safetensors)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "q"
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", out, "--method", "gptq", "--group-size", "32", "--calib", bad)
    assert result.exit_code == 2 and "bad.jsonl" in result.output, result.output
    assert _leftovers(tmp_path, "q") == []


def _leftovers(folder, name: str) -> list[str]:
    """What a run into folder/name left beside the inputs: OUT, OUT.partial, OUT.replaced, OUT.lock."""
    return [n for n in (name, f"{name}.partial", f"{name}.replaced", f"{name}.lock") if (folder / n).exists()]


SLOW_SHARD = ("import sys, time; import internvl_tools.io.writer as w; copy = w._copy_range\n"
              "def slow(*a, **k):\n"
              "    print('copying', file=sys.stderr, flush=True); time.sleep(0.3); return copy(*a, **k)\n"
              "w._copy_range = slow\n"
              "from internvl_tools.cli.main import main; sys.argv = ['internvl-tools', 'shard', sys.argv[1], '-o', sys.argv[2], "
              "'--max-shard-size', '20KB']; main()")


@pytest.mark.parametrize("signals, code, word", [(("SIGINT",), 130, "interrupted"), (("SIGINT", "SIGINT", "SIGINT"), 130, "interrupted"),
                                                 (("SIGTERM",), 143, "terminated"), (("SIGTERM", "SIGINT"), 143, "terminated")])
def test_a_stopped_streamed_command_leaves_nothing_behind(tiny, tmp_path, signals, code, word):
    """Ctrl-C or SIGTERM in the middle of a streamed command (here shard, its copies slowed down):
    one line naming how it stopped, exit 130 / 143, no OUT, no OUT.partial, no OUT.lock, even
    when more signals come while it cleans up (they used to abandon the cleanup half-way)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHARD, str(tiny("InternVL2-1B")), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "copying" in proc.stderr.readline()  # the run is writing OUT.partial now (two copiers may print on one line)
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(word) and "Traceback" not in err, err
    assert _leftovers(tmp_path, "out") == []


PUBLISH_STOPPED = ("import os, signal, sys, time; import internvl_tools.io.writer as w; fsync = w._fsync_path\n"
                   "parent, sig = w.Path(sys.argv[2]).resolve().parent, getattr(signal, sys.argv[3])\n"
                   "def late(path):\n"
                   "    if w.Path(path).resolve() == parent:  # between the renames and the old OUT's removal\n"
                   "        os.kill(os.getpid(), sig); time.sleep(0.2)\n"
                   "    fsync(path)\n"
                   "w._fsync_path = late\n"
                   "from internvl_tools.cli.main import main; sys.argv = ['internvl-tools', 'shard', sys.argv[1], '-o', sys.argv[2], "
                   "'--overwrite']; main()")


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_while_the_output_is_published_keeps_it_whole(tiny, tmp_path, name, code):
    """A stop signal while OUT.partial replaces an existing OUT (--overwrite) takes effect once the
    new OUT is in place and the old one deleted: no OUT.replaced left behind, and the line says the
    complete output is kept (not 'removed')."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("previous output")
    proc = subprocess.run([sys.executable, "-c", PUBLISH_STOPPED, str(tiny("InternVL2-1B")), str(out), name],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "was complete; it is kept" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert (out / "config.json").exists() and not (out / "old-file").exists()
    assert _leftovers(tmp_path, "out") == ["out"]


CLI_IMPORT_STOPPED = ("import builtins, sys, time\nimport internvl_tools.cli.launch as launch\n"
                      "real = builtins.__import__\n"
                      "def slow(name, *args, **kwargs):\n"
                      "    if name == 'main':  # launch's `from .main import main`: the CLI's ~0.15 s of imports, made long\n"
                      "        print('importing', flush=True); time.sleep(5)\n"
                      "    return real(name, *args, **kwargs)\n"
                      "builtins.__import__ = slow\nsys.argv = ['internvl-tools', 'shard', 'x', '-o', 'y']\nlaunch.main()\n")


@pytest.mark.parametrize("signame, code, word", [("SIGINT", 130, "interrupted (Ctrl-C)"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_a_stop_signal_while_the_cli_is_imported(signame, code, word):
    """Ctrl-C / SIGTERM before the command has installed its own stop handling (the CLI's imports)
    ends with one line and 130 / 143, not a traceback or a silent death (fresh-user review)."""
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", CLI_IMPORT_STOPPED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "importing"
    proc.send_signal(getattr(signal, signame))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert err == f"{word}: stopped before anything was written; run the command again\n"
