"""The three-stage pipeline behind every streamed transform: read -> compute -> write.

A reader thread maps the source tensors of the next items (and faults their pages in, so a
page-cache miss is paid there, not in the computation), the calling thread computes each
item's outputs, and a writer thread writes them (pwrite) or copies a tensor that passes
unchanged in the kernel (copy_file_range), so reading, computing and writing overlap.

Memory stays bounded: every item holds a cost in bytes (its sources, then its outputs) from the
moment the reader takes it until the writer is done with it, and items enter only while the
total held is at most the budget (`pipeline_budget`); an item larger than the budget enters
alone. Outputs are written at their planned offsets, so the bytes are the same as in a serial
run, whatever the timing.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

PIPELINE_BYTES = 3 * 2**29  # 1.5 GiB: the most an in-flight pipeline holds, when the bound allows it
POPULATE_MIN = 1 << 20  # tensors this large are faulted in by the reader thread
_DONE = object()


@dataclass
class Item:
    """One unit of work: outputs computed from the same sources, or one tensor copied unchanged.

    `outputs`: (name, fn) pairs, fn(*tensors) -> tensor (None: the source itself); `stored`:
    where a copied tensor's bytes lie (then `outputs` holds its one name); `source_bytes` /
    `output_bytes`: what the item holds in memory while it is read / written."""

    outputs: list[tuple[str, Callable | None]]
    sources: tuple[str, ...] = ()
    stored: object | None = None
    source_bytes: int = 0
    output_bytes: int = 0
    input_bytes: int = 0  # newly consumed input bytes, for the progress bar
    results: list = field(default_factory=list)

    @property
    def cost(self) -> int:
        return self.source_bytes + self.output_bytes


def pipeline_budget(items: list[Item], largest: int) -> int:
    """Bytes the pipeline may hold at once: PIPELINE_BYTES, but at most 2 x `largest` (the
    checkpoint's largest tensor: the peak RSS bound is 1 GiB + 2 x largest) and never less
    than the costliest item (which then runs alone)."""
    costliest = max((item.cost for item in items), default=0)
    return max(costliest, min(PIPELINE_BYTES, 2 * largest))


class _Budget:
    """A byte budget shared by the threads; `abort()` wakes every waiter, which then raises."""

    def __init__(self, limit: int):
        self.limit, self.held, self.aborted = limit, 0, False
        self._cond = threading.Condition()

    def acquire(self, amount: int) -> None:
        if amount == 0 and not self.aborted:
            return
        with self._cond:
            while not self.aborted and self.held and self.held + amount > self.limit:
                self._cond.wait()
            if self.aborted:
                raise _Aborted
            self.held += amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.held -= amount
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


class _Aborted(Exception):
    pass


def run_pipeline(view, writer, items: list[Item], *, budget: int, progress: Callable[[int], None] | None = None) -> None:
    """Compute and write every item through `writer` (a CheckpointWriter), reading sources from
    `view` (CheckpointReader or a view). The first error of any stage stops the others and is
    raised here, as it was raised (CheckpointError, InputError, OSError, ...)."""
    limit = _Budget(budget)
    ready: queue.Queue = queue.Queue()  # reader -> compute; bounded by the budget
    written: queue.Queue = queue.Queue()  # compute -> writer; bounded by the budget
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        limit.abort()

    def read() -> None:
        try:
            for item in items:
                limit.acquire(item.cost)
                if item.stored is None:
                    tensors = [view.get(name) for name in item.sources]
                    for tensor in tensors:
                        populate(tensor)
                    item.results = tensors
                ready.put(item)
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)
        finally:
            ready.put(_DONE)

    def write() -> None:
        try:
            while (item := written.get()) is not _DONE:
                if errors:
                    continue  # drain: the run is failing
                if item.stored is not None:
                    writer.copy_stored(item.outputs[0][0], item.stored)
                else:
                    for name, tensor in item.results:
                        writer.write(name, tensor)
                    item.results = []
                limit.release(item.output_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)
            while written.get() is not _DONE:
                pass

    reader = threading.Thread(target=read, name="internvl-tools-read", daemon=True)
    writer_thread = threading.Thread(target=write, name="internvl-tools-write", daemon=True)
    reader.start()
    writer_thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if errors:
                break
            if item.stored is None:
                tensors, item.results = item.results, []
                item.results = [(name, (tensors[0] if fn is None else fn(*tensors)).contiguous()) for name, fn in item.outputs]
                del tensors
                limit.release(item.source_bytes)
            written.put(item)
            if progress:
                progress(item.input_bytes)
    except BaseException as exc:
        fail(exc)
    finally:
        written.put(_DONE)  # the writer finishes what it was given (or drains it, after an error)
        writer_thread.join()
        reader.join()  # never blocked: `ready` is unbounded and a failure aborts the budget
    if errors:
        raise errors[0]


def populate(tensor) -> None:
    """Fault a CPU tensor's pages in (MADV_POPULATE_READ; page cache misses are read now, in the
    calling thread, without dirtying the pages of a copy-on-write mapping). Best effort: a kernel
    without it (before Linux 5.14) or another platform leaves the pages to fault on first use."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < POPULATE_MIN or _madvise() is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() // page * page
    _madvise()(start, tensor.data_ptr() + nbytes - start, MADV_POPULATE_READ)


MADV_POPULATE_READ = 22


_MADVISE: list = []


def _madvise():
    """libc's madvise through ctypes (which releases the GIL while it runs), or None."""
    if not _MADVISE:
        function = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                function = ctypes.CDLL(None, use_errno=True).madvise
                function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _MADVISE.append(function)
    return _MADVISE[0]
