"""O_DIRECT writes of tensor bodies (io/direct.py): the same bytes as buffered writes at any offset,
length and memory alignment; the body really bypasses the page cache where the file system allows
it; buffered writes when it refuses (at open, at a write, a short write) or when asked to."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import torch

from internvl_tools.io import direct
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.io.safetensors_format import TensorSpec
from internvl_tools.io.writer import CheckpointWriter, CopyStopped


def _direct_capable(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()


def _write(path: Path, files: direct.DirectFiles, offset: int, data: torch.Tensor, chunk_log: list | None = None) -> None:
    flat = data.reshape(-1).view(torch.uint8)
    fd = os.open(path, os.O_WRONLY)
    try:
        direct.write_range(files, 0, path, fd, offset, memoryview(flat.numpy()), flat.data_ptr(),
                           lambda *piece: chunk_log.append(piece) if chunk_log is not None else None, None, CopyStopped)
    finally:
        files.close_all()
        os.close(fd)


@pytest.mark.parametrize("offset", [0, 8, 4096, 4097, 123_457])
@pytest.mark.parametrize("length", [0, 6, 4096, 5000, 3 * 4096 + 10, 100_003])
@pytest.mark.parametrize("misaligned", [0, 2])
def test_write_range_gives_the_bytes_of_a_buffered_write(tmp_path, offset, length, misaligned, monkeypatch):
    """Every offset, length and memory alignment (a tensor aligned like the file, or not: through the
    staging buffer) gives exactly the bytes a plain pwrite gives, around bytes already there."""
    monkeypatch.setattr(direct, "DIRECT_CHUNK", 3 * 4096)  # several pieces
    g = torch.Generator().manual_seed(offset + length)
    backing = torch.randint(0, 256, (length + 4096 + misaligned,), dtype=torch.uint8, generator=g)
    shift = (offset - backing.data_ptr()) % 4096 + misaligned  # memory aligned like the file (+ misaligned)
    data = backing[shift:shift + length]
    assert data.numel() == length
    before = bytes(torch.randint(0, 256, (offset + length + 5000,), dtype=torch.uint8, generator=g).numpy())
    path, reference = tmp_path / "shard", tmp_path / "reference"
    path.write_bytes(before)
    reference.write_bytes(before)
    _write(path, direct.DirectFiles(enabled=True), offset, data)
    with open(reference, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(data.numpy()))
    assert path.read_bytes() == reference.read_bytes()


def test_the_body_bypasses_the_page_cache(tmp_path):
    """Where the file system takes O_DIRECT (pytest's tmp folder, else one beside the checkout), the
    aligned body is not in the page cache after the write (mincore), while the buffered head and
    tail pages are: the bytes went straight to disk. Where none does (every folder on ramfs), the
    whole range goes through the buffered path instead, and O_DIRECT is off from then on."""
    import shutil
    import tempfile

    folder = tmp_path
    if not _direct_capable(folder):
        folder = Path(tempfile.mkdtemp(dir=Path(__file__).resolve().parent.parent))
    try:
        if not _direct_capable(folder):
            path = folder / "shard"
            path.write_bytes(b"\0" * 4096)
            files, pieces = direct.DirectFiles(enabled=True), []
            data = torch.arange(40 * 4096 // 4, dtype=torch.int32)
            _write(path, files, 100, data, pieces)
            assert not files.enabled and sum(count for _fd, _offset, count in pieces) == 40 * 4096
            assert path.read_bytes()[100:] == bytes(data.view(torch.uint8).numpy())
            return
        _assert_body_bypasses_the_page_cache(folder)
    finally:
        if folder != tmp_path:
            shutil.rmtree(folder, ignore_errors=True)


def _assert_body_bypasses_the_page_cache(folder: Path) -> None:
    path = folder / "shard"
    path.write_bytes(b"\0" * (64 * 4096))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing of the file cached to begin with
    os.close(fd)
    assert not any(_resident_pages(path))
    files = direct.DirectFiles(enabled=True)
    data = torch.arange(40 * 4096 // 4, dtype=torch.int32)
    pieces = []
    _write(path, files, 100, data, pieces)
    assert files.enabled
    assert [(offset, count) for _fd, offset, count in pieces] == [(100, 4096 - 100), (100 + 39 * 4096 + 3996, 100)]
    cached = _resident_pages(path)
    assert cached[0] and cached[40] and not any(cached[1:40])
    assert path.read_bytes()[100:100 + 40 * 4096] == bytes(data.view(torch.uint8).numpy())


def _resident_pages(path: Path) -> list[bool]:
    """mincore() of the file's pages: which are in the page cache."""
    import ctypes

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (size + 4095) // 4096
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.c_void_p(address), size, vector) == 0
        libc.munmap(ctypes.c_void_p(address), size)
        return [bool(byte & 1) for byte in vector.raw]
    finally:
        os.close(fd)


def test_refusals_fall_back_to_buffered_writes(tmp_path, monkeypatch):
    """EINVAL at open (tmpfs), EINVAL at the first O_DIRECT write, and a short O_DIRECT write all end
    in the same bytes through the buffered fd; after a refusal O_DIRECT is not tried again."""
    data = torch.arange(50_000, dtype=torch.int32)
    expected = b"\0" * 300 + bytes(data.view(torch.uint8).numpy())
    real_open, real_pwrite = os.open, os.pwrite

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    direct_fds = set()

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def short_pwrite(fd, data, offset):
        if fd in direct_fds:
            return real_pwrite(fd, data[:4096 + 512], offset)  # short and off the alignment
        return real_pwrite(fd, data, offset)

    for opener, writer in ((refusing_open, real_pwrite), (tracking_open, refusing_pwrite), (tracking_open, short_pwrite)):
        direct_fds.clear()
        monkeypatch.setattr(direct.os, "open", opener)
        monkeypatch.setattr(direct.os, "pwrite", writer)
        path = tmp_path / "shard"
        path.write_bytes(b"\0" * 300)
        files = direct.DirectFiles(enabled=True)
        _write(path, files, 300, data)
        assert path.read_bytes() == expected
        assert files.enabled == (writer is short_pwrite) or not _direct_capable(tmp_path)


def test_direct_io_can_be_turned_off(tmp_path, monkeypatch, tiny, run_cli):
    """INTERNVL_TOOLS_DIRECT_IO=0 / false / no / off (any case): no O_DIRECT fd is ever opened;
    unset, empty, 1 / true / yes / on: O_DIRECT; anything else is refused in one line, exit 2."""
    for value in ("0", "false", "No", " OFF "):
        monkeypatch.setenv("INTERNVL_TOOLS_DIRECT_IO", value)
        assert not direct.direct_io_wanted() and direct.DirectFiles().fd(0, tmp_path / "x") is None
    for value in ("1", "true", "YES", "on", ""):
        monkeypatch.setenv("INTERNVL_TOOLS_DIRECT_IO", value)
        assert direct.direct_io_wanted() == hasattr(os, "O_DIRECT")
    source = tiny("InternVL2-1B")
    for value in ("garbage", "00", "disabled"):
        monkeypatch.setenv("INTERNVL_TOOLS_DIRECT_IO", value)
        result = run_cli("shard", source, "-o", tmp_path / "out")
        assert result.exit_code == 2 and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
        assert result.output.strip() == (f"error: INTERNVL_TOOLS_DIRECT_IO={value!r} is not understood: set it to 0 (buffered "
                                         "writes) or 1 (O_DIRECT where the file system allows, the default), or unset it")


@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_a_checkpoint_written_and_copied_is_the_same_either_way(tmp_path, monkeypatch, direct_io):
    """CheckpointWriter with and without O_DIRECT: computed tensors (write) and unchanged ones
    (copy_stored, read into the staging buffer) give the bytes safetensors' own writer gives."""
    from safetensors.torch import save_file

    monkeypatch.setenv("INTERNVL_TOOLS_DIRECT_IO", direct_io)
    monkeypatch.setattr(direct, "DIRECT_CHUNK", 2 * 4096)
    g = torch.Generator().manual_seed(7)
    tensors = {f"t{i}": torch.randn(1 + 37 * i, 61, generator=g).bfloat16() for i in range(12)}
    (tmp_path / "in").mkdir()
    save_file(tensors, str(tmp_path / "in" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "want").mkdir()
    save_file({k: v * 2 if i % 2 else v for i, (k, v) in enumerate(tensors.items())}, str(tmp_path / "want" / "model.safetensors"),
              metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path / "in")
    specs = [TensorSpec(s.name, s.dtype, s.shape) for s in reader.specs()]
    with CheckpointWriter(tmp_path / "out", specs, inputs=[tmp_path / "in"]) as writer:
        for i, name in enumerate(tensors):
            if i % 2:
                writer.write(name, reader.get(name) * 2)
            else:
                writer.copy_stored(name, reader.stored(name))
        writer.finalize()
    got = CheckpointReader(tmp_path / "out")
    want = CheckpointReader(tmp_path / "want")
    for name in tensors:
        assert torch.equal(got.get(name), want.get(name)), name
