"""Streaming checkpoint writer.

Shards are planned up front from tensor specs (pure `plan_shards`), so every header is known
before any data is written and each tensor goes straight to its final byte offset: nothing is
buffered beyond the tensor being written. Output goes to OUT.partial/ and is renamed to OUT
only when every tensor and file is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import CheckpointError, InputError
from .direct import DirectFiles, copy_range, write_range
from .reader import INDEX_NAME, SINGLE_NAME
from .safetensors_format import StoredTensor, TensorSpec, build_header, spec_of

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
COPY_CHUNK = 64 * 2**20  # bytes per copy_file_range of an unchanged tensor
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """Parse '5GB', '500MB', '80GiB', '1e9' or a byte count into bytes (InputError when it is not a
    size or not positive; `allow_zero`: 0 is accepted, e.g. `--reserve 0GiB`)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise InputError(f"size {text!r} is not a number with a unit; write e.g. 5GB, 500MB or 80GiB") from None
    if unit not in units or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"size {text!r}: unknown unit or not positive; write e.g. 5GB, 500MB or 80GiB")
    return int(value * units[unit])


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_shard_size` data bytes.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def plan_grouped_shards(groups: list[list[TensorSpec]], max_shard_size: int) -> list[list[TensorSpec]]:
    """Plan each group's shards separately, so no shard holds tensors of two groups (e.g. GPUs)."""
    shards = [shard for group in groups if group for shard in plan_shards(group, max_shard_size)]
    return shards or [[]]


def shard_file_names(count: int) -> list[str]:
    """model.safetensors for one shard, model-0000k-of-0000N.safetensors for several."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def check_apart(path: Path, inputs: list[Path | None], option: str = "output", *, replaced: bool = False,
                contains: bool = False) -> None:
    """Refuse an output `path` (a file or folder that `option` writes) that is an input or lies
    inside an input folder, so that no run ever overwrites or adds to its inputs.

    `replaced`: the output is a folder that a run deletes and recreates (`-o OUT` with its
    OUT.partial/ and OUT.replaced/ siblings), so it must not contain an input either.
    `contains`: the output is a folder the run writes into (verify --ref-cache): it must not contain
    an input either (no partial siblings are checked).
    InputError (one line, naming the option, the path and the input) when refused."""
    targets = [Path(path)]
    if replaced:
        targets += [Path(path).with_name(Path(path).name + suffix) for suffix in (".partial", ".replaced")]
    for target in targets:
        resolved = target.resolve()
        for source in inputs:
            if source is None:
                continue
            src = Path(source).resolve()
            wide = replaced or contains
            if resolved == src or src in resolved.parents or (wide and resolved in src.parents):
                how = "is, contains or lies inside" if wide else "is or lies inside"
                raise InputError(f"{option} {path} {how} the input {source}; inputs are never modified: "
                                 "choose a path outside the inputs")


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is, contains or lies inside an input, or is non-empty."""
    check_apart(out, inputs, "output", replaced=True)
    out_resolved = Path(out).resolve()
    if out_resolved.exists():
        if not out_resolved.is_dir():
            raise InputError(f"output {out} exists and is not a folder; choose another path")
        if any(out_resolved.iterdir()) and not overwrite:
            raise InputError(f"output {out} is not empty; pass --overwrite to replace it, or choose another folder")


def copy_side_files(source: Path, dest: Path, skip: set[str] = frozenset()) -> list[str]:
    """Copy every non-weight file (config, tokenizer, processor, remote code, examples)."""
    copied = []
    for entry in sorted(Path(source).iterdir()):
        if entry.name.startswith(".") or entry.name in skip or entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        try:
            if entry.is_dir():
                shutil.copytree(entry, dest / entry.name, symlinks=False)
            elif entry.is_file():
                shutil.copy2(entry, dest / entry.name)
            else:
                continue
        except shutil.Error as exc:  # copytree: (source, target, message) of each file that failed
            _source, target, why = exc.args[0][0]
            code = re.match(r"\[Errno (\d+)\] ([^:]*)", str(why))
            raise OSError(int(code[1]) if code else None, code[2] if code else str(why), target) from exc
        except OSError as exc:
            if exc.filename is not None:
                raise  # names its path: the input it could not read, or (filename2) the output copied to
            raise OSError(exc.errno, exc.strerror or str(exc), str(dest / entry.name)) from exc
        copied.append(entry.name)
    return copied


class OutputLock:
    """An exclusive lock on an output folder for the whole run (`OUT.lock`, flock).

    Two runs into one OUT must never both report success over an incomplete folder: the
    second one is refused while the first holds the lock. The lock file is removed when the
    run ends; a run that opened it just before is told by the inode check."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise InputError(f"{self.out}: another run is writing this output right now ({self.path} is locked); "
                             "wait for it to finish or choose another folder") from None
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _report_leftover(partial: Path) -> None:
    import sys

    print(f"warning: {partial} was left by an interrupted run; replacing it", file=sys.stderr)


class CheckpointWriter:
    """Writes planned tensors into shards of OUT.partial/, then renames it to OUT.

    Use as a context manager: on an exception the partial folder is removed and OUT is
    untouched. Tensors may be written in any order; each must match its planned spec.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: list[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        inputs: list[Path] = (),
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        groups: list[list[TensorSpec]] | None = None,
        resumable: bool = False,
        reopen: bool = True,
        leftover: Callable[[Path], None] | None = None,
    ):
        """`groups`, when given, splits `specs` into groups that never share a shard file.

        `resumable`: an error keeps OUT.partial/ (for `resume`), and (with `reopen`) an existing
        OUT.partial/ whose shard headers equal this plan's is reopened instead of recreated.
        `leftover(partial)` is called before an existing OUT.partial/ is replaced (default: a
        warning line on stderr)."""
        self.out = Path(out)
        check_output(self.out, list(inputs), overwrite)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CheckpointError(f"{self.out}: planned output has duplicate tensor names")
        self.partial = self.out.with_name(self.out.name + ".partial")
        if groups is not None and sorted(s.name for g in groups for s in g) != sorted(names):
            raise CheckpointError(f"{self.out}: shard groups do not cover the planned tensors exactly once")
        self.plan = plan_grouped_shards(groups, max_shard_size) if groups is not None else plan_shards(specs, max_shard_size)
        self.files = shard_file_names(len(self.plan))
        self.metadata = metadata or {"format": "pt"}
        self._specs = {s.name: s for s in specs}
        self._location: dict[str, tuple[int, int]] = {}  # name -> (shard index, absolute offset)
        self._remaining = [len(shard) for shard in self.plan]
        self._fds: dict[int, int] = {}
        self._written: set[str] = set()
        self._claimed: set[str] = set()
        self.bytes_written = 0
        self.resumable = resumable
        self.resumed = False
        self._reopen, self._leftover = reopen, leftover or _report_leftover
        self._inputs, self._overwrite = list(inputs), overwrite
        self._lock = OutputLock(self.out)
        self._syncer = Syncer()
        self._direct = DirectFiles()  # the O_DIRECT side of the shard files (io/direct.py)
        # write() and copy_stored() run in several threads at once (the pipeline's output
        # threads): the bookkeeping (specs written, open fds, shards left) is kept under this lock;
        # the bytes themselves are written outside it
        self._guard = threading.Lock()

    def __enter__(self) -> CheckpointWriter:
        self._lock.__enter__()
        try:
            check_output(self.out, self._inputs, self._overwrite)  # again, now that no other run can write OUT
            self._start()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def _start(self) -> None:
        headers = [build_header(shard, self.metadata) for shard in self.plan]
        if self.resumable and self._reopen and self._matches(headers):
            self.resumed = True
        else:
            if self.partial.exists():
                self._leftover(self.partial)
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            for index, (header, _) in enumerate(headers):
                with open(self.partial / self.files[index], "wb") as handle:
                    handle.write(header)
        for index, (_, offsets) in enumerate(headers):
            for name, offset in offsets.items():
                self._location[name] = (index, offset)

    def _matches(self, headers: list[tuple[bytes, dict]]) -> bool:
        """Whether OUT.partial/ holds shards started from exactly this plan."""
        for index, (header, _) in enumerate(headers):
            path = self.partial / self.files[index]
            if not path.is_file():
                return False
            with open(path, "rb") as handle:
                if handle.read(len(header)) != header:
                    return False
        return True

    def mark_written(self, names: list[str]) -> None:
        """Record tensors a previous, interrupted run already wrote (resume)."""
        for name in names:
            self._claim(name, self._specs[name])
            self._done(name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._syncer.close(wait=exc_type is None)  # after an error: pending writebacks dropped, its fds closed
        self._direct.close_all()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if exc_type is not None and self.partial.exists() and not self.resumable:
            shutil.rmtree(self.partial, ignore_errors=True)
        self._lock.__exit__()

    # -- tensors -----------------------------------------------------------------------
    def write(self, name: str, tensor, stop: Callable[[], bool] | None = None) -> None:
        """Write one in-memory torch tensor at its planned place (thread-safe: see copy_stored;
        `stop` as there, asked before each piece of direct.DIRECT_CHUNK bytes; the page-aligned
        body goes with O_DIRECT where the file system allows)."""
        import torch

        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        fd, offset = self._claim(name, spec_of(name, tensor))
        index = self._location[name][0]
        try:
            write_range(self._direct, index, self.partial / self.files[index], fd, offset, memoryview(flat.numpy()),
                        flat.data_ptr(), self._syncer.writeback, stop, CopyStopped)
        except OSError as exc:
            raise self._write_error(name, exc) from exc
        self._done(name)

    def copy_stored(self, name: str, source: StoredTensor, stop: Callable[[], bool] | None = None) -> None:
        """Copy a tensor's bytes straight from its source shard: the page-aligned body read into
        a staging buffer and written with O_DIRECT (io/direct.py), the rest (or all, without
        O_DIRECT) in the kernel when possible.

        write() and copy_stored() may be called from several threads at once, for different
        tensors (the pipeline copies unchanged tensors while it writes computed ones). `stop()`
        is asked before each piece of COPY_CHUNK (direct.DIRECT_CHUNK) bytes: True raises CopyStopped (the run is
        failing elsewhere; the tensor is left incomplete)."""
        fd, offset = self._claim(name, TensorSpec(name, source.spec.dtype, source.spec.shape))
        index = self._location[name][0]
        with open(source.path, "rb", buffering=0) as src:

            def in_kernel(at: int, to: int, count: int) -> None:  # head, tail, or all without O_DIRECT
                _copy_range(src.fileno(), at, fd, to, count, self._syncer.writeback, stop)

            try:
                copy_range(self._direct, index, self.partial / self.files[index], src.fileno(), source.offset, offset,
                           source.nbytes, in_kernel, stop, CopyStopped,
                           lambda: CheckpointError("source shard ended early while copying"))
            except OSError as exc:
                raise self._write_error(name, exc) from exc
            except CheckpointError as exc:  # the source ended early: name it and the tensor
                raise CheckpointError(f"{source.path}: {exc} (tensor {source.spec.name!r}); the file changed during the run: "
                                      "run again on a complete checkpoint") from exc
        self._done(name)

    def _write_error(self, name: str, exc: OSError) -> CheckpointError:
        """A one-line error naming the shard being written (e.g. a full disk)."""
        index, _ = self._location[name]
        path = self.partial / self.files[index]
        hint = "free disk space and run again" if exc.errno == 28 else "check the output folder"
        return CheckpointError(f"{path}: {exc.strerror or exc} while writing {name!r}; {hint}")

    def finalize(self, side_files_from: Path | None = None, files: dict[str, object] | None = None) -> Path:
        """Check completeness, write the index and side files, and rename OUT.partial to OUT.

        `files` maps a file name to bytes/str or a JSON-able object written in place of
        (or in addition to) the copied side files, e.g. an updated config.json; None leaves
        that side file out of the output.
        """
        missing = [name for name in self._specs if name not in self._written]
        if missing:
            raise CheckpointError(f"{self.out}: {len(missing)} planned tensors were never written (first: {missing[0]!r})")
        # the syncer first: its pending writebacks name fds closed below, and it fsyncs (and
        # closes) the shards finished earlier; a failed fsync raises here
        self._syncer.close(wait=True)
        self._direct.close_all()
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.plan) > 1:
            self._write_index()
        if side_files_from is not None:
            copy_side_files(side_files_from, self.partial, skip=set(files or ()))
        for filename, content in (files or {}).items():
            if content is not None:  # None: leave that side file out
                write_file(self.partial / filename, content)
        return self._commit()

    # -- internals -----------------------------------------------------------------------
    def _check_spec(self, name: str, spec: TensorSpec) -> None:
        planned = self._specs.get(name)
        if planned is None:
            raise CheckpointError(f"{self.out}: tensor {name!r} is not in the planned output")
        if (planned.dtype, planned.shape) != (spec.dtype, spec.shape):
            raise CheckpointError(
                f"{self.out}: tensor {name!r} is {spec.dtype} {list(spec.shape)} but {planned.dtype} {list(planned.shape)} was planned"
            )
        if name in self._written:
            raise CheckpointError(f"{self.out}: tensor {name!r} written twice")

    def shard_of(self, name: str) -> int:
        """The index of the planned shard file `name` goes to (KeyError for a name not planned)."""
        return self._location[name][0]

    def _claim(self, name: str, spec: TensorSpec) -> tuple[int, int]:
        """Check `name` against the plan and claim it for writing: (fd of its shard, offset)."""
        with self._guard:
            self._check_spec(name, spec)
            if name in self._claimed:
                raise CheckpointError(f"{self.out}: tensor {name!r} written twice")
            self._claimed.add(name)
            return self._target(name)

    def _target(self, name: str) -> tuple[int, int]:
        index, offset = self._location[name]
        if index not in self._fds:
            self._fds[index] = os.open(self.partial / self.files[index], os.O_WRONLY)
        return self._fds[index], offset

    def _done(self, name: str) -> None:
        with self._guard:
            self._written.add(name)
            self.bytes_written += self._specs[name].nbytes
            index, _ = self._location[name]
            self._remaining[index] -= 1
            if self._remaining[index] == 0:
                self._direct.close(index)
            if self._remaining[index] == 0 and index in self._fds:
                # a complete shard is fsynced (then closed) by the syncer thread while the next one is written;
                # finalize() waits for it: the rename at the end never publishes unwritten data
                self._syncer.fsync_and_close(self._fds.pop(index), lambda exc, name=name: self._write_error(name, exc))

    def _write_index(self) -> None:
        weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.plan) for spec in shard}
        total = sum(spec.nbytes for spec in self._specs.values())
        write_file(self.partial / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    def _commit(self) -> Path:
        return publish(self.partial, self.out)


def publish(partial: Path, out: Path) -> Path:
    """Rename a finished OUT.partial/ to OUT, replacing an existing OUT only after that succeeded.

    Every file and folder of OUT.partial/ is fsynced first (side files, the index; shards
    already are, which costs nothing more), and the parent folder after the renames, before an
    existing OUT is deleted: a crash just after success leaves the complete OUT (or the old one),
    never one with an empty config or index."""
    sync_tree(partial)
    with signals_held():  # Ctrl-C / SIGTERM take effect after: never between the renames, never with OUT.replaced left
        old = None
        if out.exists():
            old = out.with_name(out.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        partial.rename(out)
        _fsync_path(out.parent)
        if old is not None:
            shutil.rmtree(old)
        PUBLISHED.append(out)
    return out


PUBLISHED: list[Path] = []  # outputs this process published (a stop signal after them must not call them unfinished)


HOLD: dict = {"depth": 0, "pending": None}  # signals_held(): nesting depth, a stop signal that came meanwhile


@contextmanager
def signals_held():
    """Hold stop signals back for the block: a stop handler that honours HOLD (the CLI's
    cli.common.stop_handler) records a SIGINT / SIGTERM that comes meanwhile in HOLD["pending"]
    instead of raising, and it is raised again (signal.raise_signal) when the outermost block
    ends. Python runs signal handlers in the main thread only, whichever thread the kernel gave
    the signal to, so this flag (not a thread's signal mask) is what holds them."""
    import signal

    HOLD["depth"] += 1
    try:
        yield
    finally:
        HOLD["depth"] -= 1
        if HOLD["depth"] == 0 and HOLD["pending"] is not None:
            signum, HOLD["pending"] = HOLD["pending"], None
            signal.raise_signal(signum)


def sync_tree(folder: Path) -> None:
    """fsync every regular file and folder under `folder` (itself included); symlinks are skipped."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(root))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty OUT.partial/ to fill; renamed to OUT on success, removed on an exception."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    with OutputLock(out):
        if partial.exists():
            _report_leftover(partial)
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        publish(partial, out)


def write_file(path: Path, content: object) -> None:
    """Write bytes, text, or a JSON object (indented, as transformers writes config.json).
    An OSError (a full disk) names `path`."""
    try:
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


class Syncer:
    """A thread that gets written bytes to disk while the run goes on: it starts the writeback
    of each written range (start_writeback) and fsyncs, then closes, each finished shard. Doing
    it here, not in the writing thread, keeps the writeback work (block allocation, I/O
    submission) and the fsync waits off the path that copies and writes: on 2 cores the disk
    then works from the first tensor on, as the kernel's flusher threads do for `cp`, but
    without waiting for the dirty-page threshold. An fsync error is raised by the next call
    (or by close(wait=True)), as the writer's one-line CheckpointError."""

    def __init__(self):
        self._queue = None
        self._thread = None
        self._finished: threading.Event | None = None  # set when the thread's loop has ended
        self._closed = False
        self._error: BaseException | None = None
        self._starting = threading.Lock()  # the pipeline's output threads all hand work over

    def writeback(self, fd: int, offset: int, count: int) -> None:
        """Start the writeback of bytes [offset, offset + count) of `fd` (asynchronous)."""
        self._put(("range", fd, offset, count))

    def fsync_and_close(self, fd: int, error) -> None:
        """Hand over `fd` of a finished shard: fsynced then closed in the thread; an OSError of
        the fsync becomes `error(exc)`. The fd is closed even when it cannot be handed over (an
        earlier error, which is then raised, or a closed syncer)."""
        try:
            self._put(("close", fd, error))
        except BaseException:
            os.close(fd)
            raise

    def close(self, *, wait: bool) -> None:
        """Stop the thread once the queue is done (`wait`), or after dropping pending writebacks
        (the fds handed over are closed either way); with `wait`, raise the first error. Waits
        until the thread has closed every fd it was given, even through Ctrl-C (raised after):
        the writer closes its own fds next, and Thread.join() interrupted by a signal can report
        a thread still running as finished (CPython gh-90882, 3.10-3.12)."""
        with self._starting:
            self._closed = True
            started, self._thread = self._thread, None
            if started is not None:
                if not wait:
                    self._error = self._error or _Stopped()
                self._queue.put(None)
        interrupted = None
        while started is not None and not self._finished.is_set():
            try:
                self._finished.wait(0.05)
            except BaseException as exc:  # noqa: BLE001 - raised once the thread is done
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted
        if wait and self._error is not None and not isinstance(self._error, _Stopped):
            raise self._error

    def _put(self, task) -> None:
        if self._error is not None and not isinstance(self._error, _Stopped):
            raise self._error
        with self._starting:
            if self._closed:  # after close(): nothing is started again; a handed-over fd is closed here
                if task[0] == "close":
                    os.close(task[1])
                return
            if self._thread is None:
                import queue

                self._queue, self._finished = queue.Queue(), threading.Event()
                thread = threading.Thread(target=self._run, name="internvl-tools-sync", daemon=True)
                thread.start()
                self._thread = thread
            self._queue.put(task)

    def _run(self) -> None:
        try:
            while (task := self._queue.get()) is not None:
                try:
                    if task[0] == "range":
                        if self._error is None:
                            start_writeback(*task[1:])
                        continue
                    _, fd, error = task
                    try:
                        if self._error is None:
                            os.fsync(fd)
                    except OSError as exc:
                        self._error = error(exc)
                    finally:
                        os.close(fd)
                except BaseException as exc:  # noqa: BLE001 - an unexpected failure (a close's error): reported, never silent
                    self._error = self._error or exc
        finally:
            self._finished.set()


class _Stopped(Exception):
    """The syncer was stopped after an error elsewhere (nothing to report)."""


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Have the kernel start writing a just-written byte range to disk now (Linux
    sync_file_range with SYNC_FILE_RANGE_WRITE: asynchronous, it returns once the writes are
    queued), so the disk works from the first tensor on instead of when the dirty-page threshold
    is reached, and the fsync at a shard's end finds little left. Best effort: a no-op where the
    call is missing or refused (durability still comes from the fsync)."""
    function = _sync_file_range()
    if function is not None and count > 0:
        function(fd, offset, count, SYNC_FILE_RANGE_WRITE)


SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE: list = []


def _sync_file_range():
    """libc's sync_file_range through ctypes (which releases the GIL while it runs), or None."""
    if not _SYNC_FILE_RANGE:
        function = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _SYNC_FILE_RANGE.append(function)
    return _SYNC_FILE_RANGE[0]


class CopyStopped(Exception):
    """A copy was stopped by its `stop()` callback before its end."""


_NO_KERNEL_COPY: set[tuple[int, int]] = set()  # (source device, output device) pairs copy_file_range refused


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int, written=None, stop=None) -> None:
    """Copy a byte range between files, in the kernel where the platform allows, in pieces of
    COPY_CHUNK bytes; `written(fd, offset, count)` is told of each piece (writeback); `stop()`,
    when given, is asked before each piece (True: CopyStopped). Where the kernel refuses the copy
    between two file systems (EXDEV across devices before Linux 5.3 and to tmpfs, ENOSYS, EINVAL,
    EOPNOTSUPP), the bytes go through a buffer, and later ranges between the same two devices go
    there at once."""
    import errno

    devices = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    try:
        while count and devices not in _NO_KERNEL_COPY:
            if stop is not None and stop():
                raise CopyStopped
            done = os.copy_file_range(src_fd, dst_fd, min(count, COPY_CHUNK), src_offset, dst_offset)
            if done == 0:
                raise CheckpointError("source shard ended early while copying")
            if written is not None:
                written(dst_fd, dst_offset, done)
            src_offset, dst_offset, count = src_offset + done, dst_offset + done, count - done
    except (AttributeError, OSError) as exc:
        if isinstance(exc, AttributeError) or exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            _NO_KERNEL_COPY.add(devices)
    chunk = 64 * 2**20
    while count:
        if stop is not None and stop():
            raise CopyStopped
        data = os.pread(src_fd, min(chunk, count), src_offset)
        if not data:
            raise CheckpointError("source shard ended early while copying") from None
        view = memoryview(data)
        while view.nbytes:  # pwrite may write less than asked (FUSE, network file systems)
            done = os.pwrite(dst_fd, view, dst_offset)
            if written is not None:
                written(dst_fd, dst_offset, done)
            view, dst_offset = view[done:], dst_offset + done
        src_offset, count = src_offset + len(data), count - len(data)
