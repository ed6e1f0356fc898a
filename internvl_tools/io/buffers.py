"""Output tensors reused from item to item of a streamed transform (transforms/pipeline.py).

The pipeline activates an OutputPool for its computing thread (`active_pool`); the format
kernels (formats/) and merge-lora take their large outputs with output_tensor / output_like,
which fall back to torch.empty anywhere else.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


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
    to make room for one of another shape. A tensor is known by the very object take() returned
    (held weakly): only that object comes back, and one dropped without being given back (an
    output split into views, a failed item) just stops counting as lent. Thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free: dict[tuple, list] = {}  # (numel, dtype) -> flat tensors ready for reuse
        self._lent: dict[int, tuple] = {}  # id of a tensor handed out -> (weak ref, its flat storage view's key)
        self.free_bytes = self.lent_bytes = 0
        # reentrant: a lent tensor's weakref callback may run in a thread that holds the lock
        self._lock = threading.RLock()

    def take(self, shape: tuple[int, ...], dtype):
        """An uninitialised tensor of `shape` and `dtype` (torch.empty's contract)."""
        import math
        import weakref

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
            self.lent_bytes += nbytes  # reserved now: a give_back meanwhile sees it
        try:
            if flat is None:
                flat = torch.empty(numel, dtype=dtype)
        except BaseException:
            with self._lock:
                self.lent_bytes -= nbytes
            raise
        tensor = flat.view(shape)
        with self._lock:
            if numel:
                ident = id(tensor)
                self._lent[ident] = (weakref.ref(tensor, lambda _ref, ident=ident: self._forget(ident, _ref)), key)
            else:
                self.lent_bytes -= nbytes
        return tensor

    def give_back(self, tensor) -> None:
        """Return the very tensor take() gave, once its bytes are no longer needed; anything else
        (a view of it, a tensor the pool did not lend, one given back already) is ignored."""
        with self._lock:
            entry = self._lent.get(id(tensor))
            if entry is None or entry[0]() is not tensor:
                return
            del self._lent[id(tensor)]
            key = entry[1]
            nbytes = key[0] * key[1].itemsize
            self.lent_bytes -= nbytes
            if self.lent_bytes + self.free_bytes + nbytes <= self.limit:
                self._free.setdefault(key, []).append(tensor.reshape(-1))
                self.free_bytes += nbytes

    def _forget(self, ident: int, ref) -> None:
        """A lent tensor died without being given back: it no longer counts as lent."""
        with self._lock:
            entry = self._lent.get(ident)
            if entry is not None and entry[0] is ref:
                del self._lent[ident]
                self.lent_bytes -= entry[1][0] * entry[1][1].itemsize


_ACTIVE = threading.local()  # the OutputPool of the pipeline run computing in this thread


@contextmanager
def active_pool(pool: OutputPool):
    """Within the block, output_tensor / output_like called from this thread take from `pool`."""
    before = getattr(_ACTIVE, "pool", None)
    _ACTIVE.pool = pool
    try:
        yield pool
    finally:
        _ACTIVE.pool = before


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
