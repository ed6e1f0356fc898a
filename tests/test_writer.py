"""The writer: planned shards, index, side files, atomic OUT.partial -> OUT, refused outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from internvl_tools.errors import InputError
from internvl_tools.io.reader import INDEX_NAME, CheckpointReader
from internvl_tools.io.safetensors_format import TensorSpec
from internvl_tools.io.writer import CheckpointWriter, parse_size, plan_shards, shard_file_names


def _specs(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]


def test_plan_shards_rolls_at_limit():
    plan = plan_shards(_specs(40, 40, 40, 10, 100, 5), 100)
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]]


def test_plan_shards_oversized_tensor_gets_own_shard():
    plan = plan_shards(_specs(10, 500, 10), 100)
    assert [len(s) for s in plan] == [1, 1, 1]


def test_plan_shards_empty():
    assert plan_shards([], 100) == [[]]


def test_shard_names():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3)[1] == "model-00002-of-00003.safetensors"


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("80GiB", 80 * 2**30), ("1.5KB", 1500), ("1024", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        parse_size(text)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.scale": torch.randn(7, generator=g),
        "c.int": torch.arange(100, dtype=torch.int32).reshape(10, 10),
        "d.empty": torch.empty(0, 4, dtype=torch.float16),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def test_write_read_round_trip_any_order(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.float16: "F16", torch.float64: "F64"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    out = tmp_path / "out"
    with CheckpointWriter(out, specs, max_shard_size=2000) as writer:
        for name in reversed(list(tensors)):
            writer.write(name, tensors[name])
        writer.finalize(files={"config.json": {"x": 1}})
    assert not (tmp_path / "out.partial").exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(set(index["weight_map"].values())) == shard_file_names(len(set(index["weight_map"].values())))
    loaded = {}
    for shard in sorted(out.glob("*.safetensors")):
        loaded.update(load_file(shard))  # the reference library reads our files
    with CheckpointReader(out) as reader:
        for name, tensor in tensors.items():
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
            assert torch.equal(reader.get(name), tensor)
    assert json.loads((out / "config.json").read_text()) == {"x": 1}


def test_single_shard_has_no_index(tmp_path):
    out = tmp_path / "one"
    with CheckpointWriter(out, [TensorSpec("x", "F32", (3,))]) as writer:
        writer.write("x", torch.ones(3))
        writer.finalize()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, [TensorSpec("x", "F32", (3,))]) as writer:
            raise RuntimeError("boom")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_wrong_spec_and_missing_tensor_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="planned"):
        with CheckpointWriter(out, [TensorSpec("x", "F32", (3,))]) as writer:
            writer.write("x", torch.ones(4))
    with pytest.raises(InputError, match="never written"):
        with CheckpointWriter(out, [TensorSpec("x", "F32", (3,)), TensorSpec("y", "F32", (1,))]) as writer:
            writer.write("x", torch.ones(3))
            writer.finalize()
    assert not out.exists()


def test_refuses_output_in_or_equal_to_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(InputError, match="input"):
            CheckpointWriter(out, [], inputs=[src])


def test_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="--overwrite"):
        CheckpointWriter(out, [])
    assert (out / "keep.txt").read_text() == "precious"
    with CheckpointWriter(out, [TensorSpec("x", "F32", (1,))], overwrite=True) as writer:
        writer.write("x", torch.zeros(1))
        writer.finalize()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_side_files_copied_weights_not(tiny, copy_of, tmp_path):
    src = copy_of(tiny("InternVL2-8B"))
    (src / "modeling_internvl_chat.py").write_text("# remote code\n")
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "examples").mkdir()
    (src / "examples" / "image1.txt").write_text("x")
    out = tmp_path / "out"
    with CheckpointReader(src) as reader:
        specs = reader.specs()
        with CheckpointWriter(out, specs, inputs=[src]) as writer:
            for name in reader.keys():
                writer.write(name, reader.get(name))
            writer.finalize(side_files_from=src)
    names = {p.name for p in out.iterdir()}
    for expected in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "preprocessor_config.json", "modeling_internvl_chat.py", "examples"):
        assert expected in names
    assert "pytorch_model.bin" not in names
    for name in ("config.json", "tokenizer.json", "modeling_internvl_chat.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_failed_fsync_of_a_finished_shard_publishes_nothing(tmp_path, monkeypatch):
    """Finished shards are fsynced by the writer's syncer thread while the next shard is written;
    a failed fsync there (a full or failing disk) must stop the run with the one-line error that
    names the shard, and OUT must never appear."""
    import errno
    import os

    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    specs = [TensorSpec("a", "F32", (300,)), TensorSpec("b", "F32", (300,))]  # one shard each
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(InputError) as caught:
        with CheckpointWriter(out, specs, max_shard_size=1500) as writer:
            writer.write("a", torch.ones(300))  # shard 1 complete: handed to the syncer
            writer.write("b", torch.ones(300))
            writer.finalize()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls, "the finished shard was never fsynced"
    assert "model-00001-of-00002.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()


def _source_shard(tmp_path, values):
    from safetensors.torch import save_file

    folder = tmp_path / "in"
    folder.mkdir()
    save_file({"t": values}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return CheckpointReader(folder)


def test_copy_fallback_writes_every_byte_of_short_writes(tmp_path, monkeypatch):
    """Where copy_file_range is refused (another file system, FUSE), the pread/pwrite fallback
    copies; a pwrite that writes less than asked is continued, never skipped over."""
    import errno
    import os

    values = torch.arange(100_000, dtype=torch.float32)
    reader = _source_shard(tmp_path, values)
    real_pwrite = os.pwrite

    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, memoryview(data)[:4093], offset))
    out = tmp_path / "out"
    with CheckpointWriter(out, reader.specs(), inputs=[tmp_path / "in"]) as writer:
        writer.copy_stored("t", reader.stored("t"))
        writer.finalize()
    assert torch.equal(load_file(out / "model.safetensors")["t"], values)


def test_write_stops_between_pieces_and_publishes_nothing(tmp_path, monkeypatch):
    """write(stop=...) asks before every DIRECT_CHUNK piece (the pipeline's writer stops soon
    after another thread failed, not after a multi-GB tensor); the run then leaves no OUT."""
    from internvl_tools.io import direct
    from internvl_tools.io import writer as writer_module

    monkeypatch.setattr(direct, "DIRECT_CHUNK", 4096)
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3

    out = tmp_path / "out"
    with pytest.raises(writer_module.CopyStopped):
        with CheckpointWriter(out, [TensorSpec("a", "F32", (100_000,))]) as writer:
            writer.write("a", torch.ones(100_000), stop=stop)
    assert len(asked) == 4 and not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_syncer_failure_is_never_silent(tmp_path, monkeypatch):
    """An unexpected error in the syncer thread (here its writeback call) stops the run at
    finalize with that error, with nothing published; later shards are never left unsynced
    behind a success."""
    from internvl_tools.io import writer as writer_module

    def broken(*args):
        raise RuntimeError("sync_file_range failed unexpectedly")

    monkeypatch.setattr(writer_module, "start_writeback", broken)
    specs = [TensorSpec("a", "F32", (300,)), TensorSpec("b", "F32", (300,))]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="unexpectedly"):
        with CheckpointWriter(out, specs, max_shard_size=1500) as writer:
            writer.write("a", torch.ones(300))
            writer.write("b", torch.ones(300))
            writer.finalize()
    assert not out.exists()


def test_publish_syncs_side_files_and_folders(tmp_path, monkeypatch):
    """Before OUT appears, every file of OUT.partial (config, index, shards) and the folder itself
    are fsynced, and the parent folder after the rename: a crash just after success cannot leave
    an OUT with an empty config or index."""
    import os

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    specs = [TensorSpec("a", "F32", (300,)), TensorSpec("b", "F32", (300,))]
    out = tmp_path / "out"
    with CheckpointWriter(out, specs, max_shard_size=1500) as writer:
        writer.write("a", torch.ones(300))
        writer.write("b", torch.ones(300))
        writer.finalize(files={"config.json": {"model_type": "internvl_chat"}})
    names = {os.path.basename(path) for path in synced}
    assert {"config.json", INDEX_NAME, "model-00001-of-00002.safetensors", "out.partial"} <= names
    assert str(tmp_path) in synced  # the parent, after the rename


def test_copies_between_file_systems_try_the_kernel_copy_once(tmp_path, monkeypatch):
    """copy_file_range refused between two devices (EXDEV: e.g. to tmpfs) is not tried again for
    later ranges between them; the bytes are copied through a buffer, the same bytes."""
    import errno

    from internvl_tools.io import writer as writer_module

    calls = []

    def refused(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer_module.os, "copy_file_range", refused)
    monkeypatch.setattr(writer_module, "_NO_KERNEL_COPY", set())
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(bytes(range(256)) * 40)
    target.write_bytes(b"")
    with open(source, "rb") as src, open(target, "r+b") as dst:
        for start in range(0, 10240, 1024):
            writer_module._copy_range(src.fileno(), start, dst.fileno(), start, 1024)
    assert len(calls) == 1 and target.read_bytes() == source.read_bytes()
