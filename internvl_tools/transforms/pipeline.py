"""The three-stage pipeline behind every streamed transform: read -> compute -> write.

A reader thread maps the source tensors of the next items (and faults their pages in, so a
page-cache miss is paid there, not in the computation), the calling thread computes each
item's outputs, and a writer thread writes them (pwrite), so reading, computing and writing
overlap. Tensors that pass unchanged need no reading or computing: a copier thread copies them
in the kernel (copy_file_range) from the start of the run, beside the others, so a large
unchanged tensor (an embedding table, lm_head) never waits behind the computed ones nor holds
the writer while the computation waits.

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


class OutputPool:
    """Output tensors reused from item to item within one pipeline run.

    A freshly allocated tensor of hundreds of MiB costs a page fault and a page of zeros from the
    kernel for every 4 KiB when it is first written (about a second per 3.5 GB on the 2-core
    machine of the README's benchmarks, on the computing thread), and glibc returns such
    allocations to the kernel when they are freed. So the computing thread takes its large
    outputs here (`output_like`) and the writer gives each back once its bytes are written;
    the next output of the same shape and dtype reuses it, already faulted in.

    Memory: what is lent plus what is kept free stays within `limit` bytes (the pipeline's
    budget: lent outputs are within it already), free tensors being dropped, largest first,
    to make room for one of another shape. Thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free: dict[tuple, list] = {}  # (numel, dtype) -> flat tensors ready for reuse
        self._lent: dict[int, tuple] = {}  # data_ptr -> (numel, dtype) of a tensor handed out
        self.free_bytes = self.lent_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype):
        """An uninitialised tensor of `shape` and `dtype` (torch.empty's contract)."""
        import math

        import torch

        numel = math.prod(shape)
        key = (numel, dtype)
        nbytes = numel * dtype.itemsize
        flat = None
        with self._lock:
            if self._free.get(key):
                flat = self._free[key].pop()
                self.free_bytes -= nbytes
            else:
                while self.free_bytes and self.lent_bytes + self.free_bytes + nbytes > self.limit:
                    largest = max((k for k, v in self._free.items() if v), key=lambda k: k[0] * k[1].itemsize)
                    self._free[largest].pop()
                    self.free_bytes -= largest[0] * largest[1].itemsize
        if flat is None:
            flat = torch.empty(numel, dtype=dtype)
        with self._lock:
            if numel:
                self._lent[flat.data_ptr()] = key
                self.lent_bytes += nbytes
        return flat.view(shape)

    def give_back(self, tensor) -> None:
        """Return a tensor from take() whose bytes are no longer needed; anything else is ignored
        (a tensor given back twice is kept once)."""
        with self._lock:
            key = self._lent.get(tensor.data_ptr()) if tensor.numel() else None
            if key is None or key != (tensor.numel(), tensor.dtype) or not tensor.is_contiguous():
                return
            del self._lent[tensor.data_ptr()]
            nbytes = key[0] * key[1].itemsize
            self.lent_bytes -= nbytes
            if self.lent_bytes + self.free_bytes + nbytes <= self.limit:
                self._free.setdefault(key, []).append(tensor.reshape(-1))
                self.free_bytes += nbytes


_ACTIVE = threading.local()  # the OutputPool of the pipeline run computing in this thread


def output_tensor(shape: tuple[int, ...], dtype):
    """An uninitialised CPU tensor of `shape` and `dtype` (torch.empty's contract) for an item's
    output: from the running pipeline's OutputPool when called from its computing thread, else
    a new one. The result must be returned as an output (written, then dropped), never kept."""
    import torch

    pool = getattr(_ACTIVE, "pool", None)
    if pool is None:
        return torch.empty(shape, dtype=dtype)
    return pool.take(tuple(shape), dtype)


def output_like(tensor, dtype=None):
    """output_tensor() shaped like `tensor`, in its dtype unless `dtype` is given (on its device)."""
    import torch

    if tensor.device.type != "cpu":
        return torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device)
    return output_tensor(tuple(tensor.shape), dtype or tensor.dtype)


def run_pipeline(view, writer, items: list[Item], *, budget: int, progress: Callable[[int], None] | None = None) -> None:
    """Compute and write every item through `writer` (a CheckpointWriter), reading sources from
    `view` (CheckpointReader or a view). The first error of any stage stops the others and is
    raised here, as it was raised (CheckpointError, InputError, OSError, ...)."""
    limit = _Budget(budget)
    pool = OutputPool(budget)
    ready: queue.Queue = queue.Queue()  # reader -> compute; bounded by the budget
    written: queue.Queue = queue.Queue()  # compute -> writer; bounded by the budget
    errors: list[BaseException] = []
    # copied back to front while the computed items go front to back: the two meet in the middle,
    # so they rarely write the same shard at once (a file takes one buffered write at a time)
    copies = [item for item in reversed(items) if item.stored is not None]
    computed = [item for item in items if item.stored is None]
    reporting = threading.Lock()  # progress is told by the computing thread and the copier

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        limit.abort()

    def report(amount: int) -> None:
        if progress:
            with reporting:
                progress(amount)

    def read() -> None:
        try:
            for item in computed:
                limit.acquire(item.cost)
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
                for name, tensor in item.results:
                    writer.write(name, tensor)
                for _name, tensor in item.results:
                    pool.give_back(tensor)
                item.results = []
                limit.release(item.output_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)
            while written.get() is not _DONE:
                pass

    def copy() -> None:
        # unchanged tensors hold no memory (the kernel copies them), so they need no budget and
        # can go from the first moment; a failure elsewhere stops this before the next tensor
        try:
            for item in copies:
                if errors:
                    return
                writer.copy_stored(item.outputs[0][0], item.stored)
                report(item.input_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)

    threads = [threading.Thread(target=target, name=f"internvl-tools-{name}", daemon=True)
               for name, target, wanted in (("read", read, True), ("write", write, True), ("copy", copy, bool(copies)))
               if wanted]
    for thread in threads:
        thread.start()
    _ACTIVE.pool = pool
    try:
        while (item := ready.get()) is not _DONE:
            if errors:
                break
            tensors, item.results = item.results, []
            item.results = [(name, (tensors[0] if fn is None else fn(*tensors)).contiguous()) for name, fn in item.outputs]
            del tensors
            limit.release(item.source_bytes)
            written.put(item)
            report(item.input_bytes)
    except BaseException as exc:
        fail(exc)
    finally:
        _ACTIVE.pool = None
        written.put(_DONE)  # the writer finishes what it was given (or drains it, after an error)
        for thread in threads:
            thread.join()  # the reader is never blocked: `ready` is unbounded and a failure aborts the budget
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
