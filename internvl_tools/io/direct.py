"""O_DIRECT writes of the page-aligned body of each tensor written into an output shard.

A buffered write copies every byte into the page cache, allocating each page on the way, and
the kernel writes it out later: on the README's 2-core machine that copy is the largest CPU cost
of every streamed command (4 GB: buffered + sync 9.6 s with 8.6 s of kernel time; O_DIRECT 2.4 s
with 0.4 s). With O_DIRECT the disk reads the bytes straight from the process's memory (DMA), so
a run writes at the disk's speed and leaves the page cache to the inputs. O_DIRECT wants the file
offset, the length and the memory address aligned (DIRECT_ALIGN covers the 512-byte and 4 KiB
logical blocks of common disks), and a safetensors tensor starts anywhere, so each range is
written in three parts: the unaligned head and tail (under 4 KiB each) through the shard's
buffered fd, the aligned body through its O_DIRECT fd, straight from the tensor's memory when
that is aligned alike, else through a reused aligned staging buffer. The two never touch the
same page, so the page cache never holds stale bytes of an O_DIRECT range.

A file system that refuses O_DIRECT (tmpfs, some FUSE and network file systems: EINVAL at open or
at the first write) gets buffered writes for the rest of the run; INTERNVL_TOOLS_DIRECT_IO=0
asks for buffered writes everywhere. fsync is still what makes the shard durable (the metadata
of the blocks written, and the disk's cache): the writer fsyncs every shard as before.

Linux only (os.O_DIRECT); elsewhere everything is buffered.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable

DIRECT_ALIGN = 4096  # bytes: file offset, length and memory address of each O_DIRECT write
DIRECT_CHUNK = 16 * 2**20  # bytes per O_DIRECT write (and the size of a staging buffer)
ENV = "INTERNVL_TOOLS_DIRECT_IO"


OFF, ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def direct_io_wanted() -> bool:
    """Whether O_DIRECT writes are to be tried: the platform has it and INTERNVL_TOOLS_DIRECT_IO
    is unset, empty or one of 1 / true / yes / on (any case); 0 / false / no / off ask for
    buffered writes. Raises InputError for any other value (a typo must not go unnoticed)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in OFF + ON:
        from ..errors import InputError

        raise InputError(f"{ENV}={os.environ[ENV]!r} is not understood: set it to 0 (buffered writes) or 1 (O_DIRECT "
                         "where the file system allows, the default), or unset it")
    return hasattr(os, "O_DIRECT") and value in ON


class DirectFiles:
    """The O_DIRECT fds of one writer's shard files (opened on first use, one per shard) and the
    per-thread staging buffers. Thread-safe. `enabled` turns False for good the first time the
    file system refuses O_DIRECT."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = direct_io_wanted() if enabled is None else enabled
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def fd(self, index: int, path: os.PathLike[str]) -> int | None:
        """The O_DIRECT fd of shard `index` (file `path`), or None when O_DIRECT is off or refused."""
        if not self.enabled:
            return None
        with self._lock:
            if index not in self._fds:
                try:
                    self._fds[index] = os.open(path, os.O_WRONLY | os.O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.enabled = False
                    return None
            return self._fds[index]

    def refused(self) -> None:
        """The file system refused an O_DIRECT write (EINVAL): buffered writes from now on."""
        self.enabled = False

    def close(self, index: int) -> None:
        """Close shard `index`'s O_DIRECT fd, if open (its writes are complete: O_DIRECT writes
        return when the disk has the bytes)."""
        with self._lock:
            fd = self._fds.pop(index, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def staging(self) -> tuple[memoryview, int]:
        """This thread's aligned staging buffer (DIRECT_CHUNK bytes, anonymous memory: page
        aligned) and its address."""
        held = getattr(self._local, "buffer", None)
        if held is None:
            import ctypes

            area = mmap.mmap(-1, DIRECT_CHUNK)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            held = self._local.buffer = (area, memoryview(area), address)
        return held[1], held[2]


def write_range(direct: DirectFiles, index: int, path: os.PathLike[str], fd: int, offset: int, data: memoryview,
                address: int, written: Callable[[int, int, int], None], stop: Callable[[], bool] | None,
                stopped: type[BaseException]) -> None:
    """Write `data` (contiguous bytes at memory `address`) at `offset` of shard `index`:
    the aligned body with O_DIRECT (when `direct` allows), the rest through the buffered `fd`
    (`written(fd, offset, count)` is told of each buffered piece, for its writeback). `stop()`
    is asked before each piece (True: raise `stopped`). Raises OSError as os.pwrite does."""

    def piece(position: int, size: int) -> memoryview:
        if (address + position) % DIRECT_ALIGN == 0:  # aligned like the file: straight from memory
            return data[position:position + size]
        staging, staging_address = direct.staging()
        _memmove(staging_address, address + position, size)
        return staging[:size]

    head, end = _body(offset, data.nbytes)
    position = _buffered(fd, data, offset, 0, head, written, stop, stopped)
    position = _direct(direct, index, path, offset, position, end, piece, stop, stopped)
    _buffered(fd, data, offset, position, data.nbytes, written, stop, stopped)


def copy_range(direct: DirectFiles, index: int, path: os.PathLike[str], src_fd: int, src_offset: int, offset: int,
               count: int, copy_buffered: Callable[[int, int, int], None], stop: Callable[[], bool] | None,
               stopped: type[BaseException], ended: Callable[[], BaseException]) -> None:
    """Copy `count` bytes from `src_fd` at `src_offset` to shard `index` at `offset`: the aligned
    body read (pread, from the page cache or the disk) into the staging buffer and written with
    O_DIRECT; head, tail, or everything when O_DIRECT is off, by `copy_buffered(src_offset,
    offset, count)` (the kernel's copy). A source that ends early raises `ended()`."""

    def piece(position: int, size: int) -> memoryview:
        staging, _ = direct.staging()
        if os.preadv(src_fd, [staging[:size]], src_offset + position) < size:
            raise ended()
        return staging[:size]

    head, end = _body(offset, count)
    if head:
        copy_buffered(src_offset, offset, head)
    position = _direct(direct, index, path, offset, head, end, piece, stop, stopped)
    if position < count:
        copy_buffered(src_offset + position, offset + position, count - position)


def _body(offset: int, count: int) -> tuple[int, int]:
    """(start, end) of the page-aligned body of `count` bytes written at `offset`, relative to
    the range's start: [0, start) is the head, [end, count) the tail."""
    head = min(count, -offset % DIRECT_ALIGN)
    return head, head + (count - head) // DIRECT_ALIGN * DIRECT_ALIGN


def _direct(direct: DirectFiles, index: int, path: os.PathLike[str], offset: int, start: int, end: int,
            piece: Callable[[int, int], memoryview], stop, stopped) -> int:
    """Write the range's bytes [start, end) (aligned) with O_DIRECT in pieces of DIRECT_CHUNK
    bytes, `piece(position, size)` giving each one's bytes in aligned memory; returns where it
    ended: `end`, or earlier when O_DIRECT is off or refused (EINVAL) or a write came back short
    off the alignment; the caller writes the rest buffered."""
    position = start
    direct_fd = direct.fd(index, path) if end > start else None
    while direct_fd is not None and position < end:
        if stop is not None and stop():
            raise stopped
        size = min(DIRECT_CHUNK, end - position)
        try:
            done = os.pwrite(direct_fd, piece(position, size), offset + position)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct.refused()
            break
        position += done
        if done % DIRECT_ALIGN:
            break
    return position


def _memmove(destination: int, source: int, count: int) -> None:
    """memcpy between two addresses through ctypes, which lets other threads run meanwhile (a
    memoryview slice assignment holds the GIL for the whole copy)."""
    import ctypes

    ctypes.memmove(destination, source, count)


def _buffered(fd: int, data: memoryview, offset: int, start: int, stop_at: int, written, stop, stopped) -> int:
    """Write data[start:stop_at] at offset + start through the buffered fd in pieces of
    DIRECT_CHUNK bytes (pwrite may write less than asked: FUSE, network file systems)."""
    position = start
    while position < stop_at:
        if stop is not None and stop():
            raise stopped
        done = os.pwrite(fd, data[position:min(stop_at, position + DIRECT_CHUNK)], offset + position)
        written(fd, offset + position, done)
        position += done
    return position
