"""The three-stage pipeline behind every streamed transform: read -> compute -> write.

A reader thread maps the source tensors of the next items (and faults their pages in, so a
page-cache miss is paid there, not in the computation), the calling thread computes each
item's outputs, and output threads (one per core, up to OUTPUT_THREADS_MAX) write them through
the CheckpointWriter (each tensor's page-aligned body with O_DIRECT where the file system takes
it, io/direct.py), so reading, computing and writing overlap. The same output threads copy the
tensors that pass unchanged (they need no reading or computing), from the start of the run, back
to front while the computation goes front to back, so a large unchanged tensor (an embedding
table, lm_head) never waits behind the computed ones. Two threads never write computed items into
one output shard at once (a file takes one write at a time), so when the output has several
shards the computation goes through them side by side (`interleaved`): where writes are buffered,
the kernel's copies into the page cache, their largest CPU cost, then run on every core, and
O_DIRECT writes keep more than one request at the disk.

Memory stays bounded: every item holds a cost in bytes (its sources, then its outputs) from the
moment the reader takes it until it is written, and items enter only while the
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
    errors: list[BaseException] = []
    shard_of = getattr(writer, "shard_of", lambda name: 0)
    shards = {shard_of(name) for item in items for name, _fn in item.outputs}
    threads = max(1, min(output_threads(), len(shards)))
    computed = interleaved([item for item in items if item.stored is None], shard_of, threads)
    outputs = _Outputs([item for item in items if item.stored is not None], shard_of)
    reporting = threading.Lock()  # progress is told by the computing thread and the output threads

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        limit.abort()
        outputs.abort()

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

    def output() -> None:
        # computed outputs are written (pwrite) and unchanged tensors copied in the kernel
        # (copy_file_range; they hold no memory, so they need no budget and go from the first
        # moment); a failure elsewhere stops this between pieces of a tensor
        try:
            while (taken := outputs.take()) is not None:
                busy, item = taken
                try:
                    if item.stored is not None:
                        writer.copy_stored(item.outputs[0][0], item.stored, stop=stopped)
                    else:
                        for name, tensor in item.results:
                            writer.write(name, tensor, stop=stopped)
                finally:
                    outputs.done(busy, item)
                if item.stored is not None:
                    report(item.input_bytes)
                    continue
                for _name, tensor in item.results:
                    pool.give_back(tensor)
                item.results = []
                limit.release(item.output_bytes)
        except CopyStopped:
            return  # another thread failed; its error is the one raised
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)

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
        for name, target in [("read", read)] + [(f"output-{n}", output) for n in range(threads)]:
            start(name, target)
        with active_pool(pool):
            while (item := ready.get()) is not _DONE:
                if errors:
                    break
                tensors, item.results = item.results, []
                item.results = [(name, (tensors[0] if fn is None else fn(*tensors)).contiguous()) for name, fn in item.outputs]
                del tensors
                limit.release(item.source_bytes)
                outputs.put(item)
                report(item.input_bytes)
    except BaseException as exc:
        fail(exc)
    finally:
        # wait until every started thread's work has returned, even through Ctrl-C (a failure
        # stops the others between pieces): their files are closed after this. Events, not
        # Thread.join(): a join interrupted by a signal can report a running thread as finished
        # (CPython gh-90882, 3.10-3.12)
        while True:
            try:
                outputs.close()  # the output threads finish what they were given, then return
                for done in finished:
                    while not done.is_set():
                        done.wait(0.05)
                break
            except BaseException as exc:  # noqa: BLE001 - raised below, once every thread is done
                fail(exc)
    if errors:
        raise errors[0]


OUTPUT_THREADS_MAX = 4  # output threads at most, however many cores


def output_threads() -> int:
    """Threads writing the outputs: one per core this process may run on, up to
    OUTPUT_THREADS_MAX (and never more than the output shards: two writers into one file take
    turns on its inode lock). A buffered write is CPU-bound in the kernel (its copy into the page
    cache), so writes into two files on two threads go about twice as fast: on the 2-core machine
    of the README's benchmarks, cp of two 4.6 GB files one after the other took 6.9-7.5 s, both
    at once 3.9-4.1 s."""
    return max(1, min(OUTPUT_THREADS_MAX, cores()))


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def interleaved(items: list[Item], shard_of: Callable[[str], int], lanes: int) -> list[Item]:
    """The order in which computed items are read and computed. With `lanes` > 1 output threads,
    the plan is cut at output-shard boundaries into up to `lanes` runs of about equal bytes, and
    the runs are interleaved (next, the run least far through by bytes), so that the output threads
    find computed items for different shards to write at the same time; within a run, plan order.
    With one lane, or one output shard, the plan order. Outputs are written at their planned
    offsets: the bytes are the same in any order."""
    if lanes < 2 or len(items) < 2:
        return items
    groups: list[list[Item]] = []  # consecutive items of one output shard
    last = None
    for item in items:
        shard = shard_of(item.outputs[0][0])
        if not groups or shard != last:
            groups.append([])
        groups[-1].append(item)
        last = shard
    if len(groups) < 2:
        return items
    size = [sum(max(item.output_bytes, 1) for item in group) for group in groups]
    total, runs, held = sum(size), [[]], 0
    for group, nbytes in zip(groups, size):
        if runs[-1] and len(runs) < lanes and held >= total * len(runs) / lanes:
            runs.append([])
        runs[-1].extend(group)
        held += nbytes
    totals = [sum(max(item.output_bytes, 1) for item in run) for run in runs]
    through, taken, order = [0] * len(runs), [0] * len(runs), []
    while len(order) < len(items):
        lane = min((r for r in range(len(runs)) if taken[r] < len(runs[r])), key=lambda r: through[r] / totals[r])
        item = runs[lane][taken[lane]]
        taken[lane] += 1
        through[lane] += max(item.output_bytes, 1)
        order.append(item)
    return order


class _Outputs:
    """The output threads' work: computed items, in the order the computing thread hands them over,
    and unchanged tensors to copy, back to front (the computation goes front to back: the two meet
    in the middle). A thread takes the first computed item none of whose output shards another
    thread is writing a computed item into, else the first copy whose shard no other thread is
    writing at all (writes into one file take turns on its inode lock: a second thread there would
    mostly wait), and waits while there is none. A computed item may go into a shard a copy is
    filling: a copy can take seconds (lm_head), and the computation must not wait for it."""

    def __init__(self, copies: list[Item], shard_of: Callable[[str], int]):
        self._shard_of = shard_of
        self._copies = [(frozenset({shard_of(item.outputs[0][0])}), item) for item in reversed(copies)]
        self._computed: list[tuple[frozenset, Item]] = []
        self._writing: set[int] = set()  # shards a computed item is being written into
        self._copying: set[int] = set()  # shards a copy is filling
        self._closed = self._aborted = False
        self._cond = threading.Condition()

    def put(self, item: Item) -> None:
        """A computed item (its results set) to write."""
        shards = frozenset(self._shard_of(name) for name, _tensor in item.results)
        with self._cond:
            self._computed.append((shards, item))
            self._cond.notify()

    def close(self) -> None:
        """No more computed items will come: take() returns None once everything is taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """The run failed: take() returns None from now on."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def take(self) -> tuple[frozenset, Item] | None:
        """The next (output shards, item) to write, or None when there is nothing left (or the run
        failed); blocks while every pending item's shard is being written."""
        with self._cond:
            while not self._aborted:
                for pending, avoid, busy in ((self._computed, self._writing, self._writing),
                                             (self._copies, self._writing | self._copying, self._copying)):
                    for index, (shards, item) in enumerate(pending):
                        if not shards & avoid:
                            del pending[index]
                            busy |= shards
                            return shards, item
                if self._closed and not self._computed and not self._copies:
                    return None
                self._cond.wait()
            return None

    def done(self, shards: frozenset, item: Item) -> None:
        """A thread finished writing `item` into `shards` (as take() gave them)."""
        with self._cond:
            (self._writing if item.stored is None else self._copying).difference_update(shards)
            self._cond.notify_all()


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
