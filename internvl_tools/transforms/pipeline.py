"""The three-stage pipeline behind every streamed transform: read -> compute -> write.

A reader thread maps the source tensors of the next items (and faults their pages in, so a
page-cache miss is paid there, not in the computation), the calling thread computes each
item's outputs, and a writer thread writes them (pwrite), so reading, computing and writing
overlap. Tensors that pass unchanged need no reading or computing: copier threads (one per
core, up to COPIERS_MAX, each on its own output shard) copy them in the kernel
(copy_file_range) from the start of the run, beside the others, so a large unchanged tensor (an
embedding table, lm_head) never waits behind the computed ones nor holds the writer while the
computation waits.

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

from ..io.buffers import OutputPool, active_pool
from ..io.writer import CopyStopped

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
    pool = OutputPool(budget)
    ready: queue.Queue = queue.Queue()  # reader -> compute; bounded by the budget
    written: queue.Queue = queue.Queue()  # compute -> writer; bounded by the budget
    errors: list[BaseException] = []
    copies = [item for item in items if item.stored is not None]
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

    def stopped() -> bool:
        return bool(errors)

    def write() -> None:
        try:
            while (item := written.get()) is not _DONE:
                if errors:
                    continue  # drain: the run is failing
                for name, tensor in item.results:
                    writer.write(name, tensor, stop=stopped)
                for _name, tensor in item.results:
                    pool.give_back(tensor)
                item.results = []
                limit.release(item.output_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            if not isinstance(exc, CopyStopped):  # stopped: another thread failed; its error is the one raised
                fail(exc)
            while written.get() is not _DONE:
                pass

    pending = _Copies(copies, getattr(writer, "shard_of", lambda name: 0))

    def copy() -> None:
        # unchanged tensors hold no memory (the kernel copies them), so they need no budget and
        # can go from the first moment; a failure elsewhere stops this before the next tensor
        try:
            while not errors and (taken := pending.take()) is not None:
                shard, item = taken
                try:
                    writer.copy_stored(item.outputs[0][0], item.stored, stop=stopped)
                finally:
                    pending.done(shard)
                report(item.input_bytes)
        except CopyStopped:
            return  # another thread failed; its error is the one raised
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)

    copiers = min(copier_threads(), pending.shards) if copies else 0
    finished: list[threading.Event] = []  # one per started thread, set when its work has returned

    def start(name: str, target: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                target()
            finally:
                done.set()

        threading.Thread(target=run, name=f"internvl-tools-{name}", daemon=True).start()
        finished.append(done)

    try:
        for name, target in [("read", read), ("write", write)] + [(f"copy-{n}", copy) for n in range(copiers)]:
            start(name, target)
        with active_pool(pool):
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
        # wait until every started thread's work has returned, even through Ctrl-C (a failure
        # stops the others between pieces): their files are closed after this. Events, not
        # Thread.join(): a join interrupted by a signal can report a running thread as finished
        # (CPython gh-90882, 3.10-3.12)
        ended = False
        while True:
            try:
                if not ended:
                    written.put(_DONE)  # the writer finishes what it was given (or drains it, after an error)
                    ended = True
                for done in finished:
                    while not done.is_set():
                        done.wait(0.05)
                break
            except BaseException as exc:  # noqa: BLE001 - raised below, once every thread is done
                fail(exc)
    if errors:
        raise errors[0]


COPIERS_MAX = 4  # copier threads at most, however many cores


def copier_threads() -> int:
    """Threads copying unchanged tensors: one per core this process may run on, up to
    COPIERS_MAX (and never more than the output shards that receive copies: two copies into one
    file take turns on its inode lock). A buffered copy is CPU-bound in the kernel (its memcpy
    into the page cache), so copies into two files on two threads go about twice as fast: on the
    2-core machine of the README's benchmarks, cp of two 4.6 GB files one after the other took
    6.9-7.5 s, both at once 3.9-4.1 s."""
    return max(1, min(COPIERS_MAX, cores()))


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Copies:
    """The unchanged tensors still to copy, handed to the copier threads back to front (the
    computed items go front to back: the two meet in the middle), each taking the next one whose
    output shard no other copier is writing, if there is one (a file takes one buffered write at a
    time)."""

    def __init__(self, items: list[Item], shard_of: Callable[[str], int]):
        self._items = [(shard_of(item.outputs[0][0]), item) for item in reversed(items)]
        self.shards = len({shard for shard, _ in self._items})
        self._busy: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self) -> tuple[int, Item] | None:
        """The next (output shard, item) to copy, or None when none is left."""
        with self._lock:
            if not self._items:
                return None
            index = next((i for i, (shard, _) in enumerate(self._items) if not self._busy.get(shard)), 0)
            shard, item = self._items.pop(index)
            self._busy[shard] = self._busy.get(shard, 0) + 1
            return shard, item

    def done(self, shard: int) -> None:
        """A copier finished its copy into `shard` (as take() gave it)."""
        with self._lock:
            self._busy[shard] -= 1


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
