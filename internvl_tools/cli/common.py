"""Shared CLI plumbing: one-line errors with exit code 2, progress bars, JSON output."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..errors import InputError, name_config
from ..io.reader import require_checkpoint_folder

console = Console(stderr=True)
stdout = Console() if sys.stdout.isatty() else Console(width=140)


class ToolGroup(click.Group):
    """A click group that turns InputError, click.BadParameter (an option value out of its range) and
    any other click.UsageError (unknown command or option, missing value) into one line
    `error: ...` and exit code 2 (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        from ..io.writer import HOLD, PUBLISHED

        STOP.update(signal=None, told=False)  # a new command (in-process callers run several)
        PUBLISHED.clear()
        HOLD.update(depth=0, pending=None)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (stop_signals) that no command handled itself
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"\n{interrupted_line()}", err=True)
            ctx.exit(143 if STOP["signal"] == signal.SIGTERM else 130)
        except InputError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = str(exc)
            folders = (ctx.obj or {}).get("checkpoints", {})
            if len(folders) == 1:  # `config.json: ...` raised where only the dict was known: name the folder
                message = name_config(message, next(iter(folders.values())))
            click.echo(f"error: {message}", err=True)
            ctx.exit(2)
        except click.BadParameter as exc:  # an option value out of range / not a choice: one line, exit 2
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc.format_message()}", err=True)
            ctx.exit(2)
        except click.UsageError as exc:  # an unknown command or option, a missing value or argument: one line, exit 2
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = exc.ctx.command_path if exc.ctx is not None else \
                " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
            click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            ctx.exit(2)
        except OSError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            # a two-path error (a copy, a rename) is about the second path: the one being written
            where = exc.filename2 or exc.filename
            click.echo(f"error: {f'{where}: ' if where else ''}{exc.strerror or exc}; {os_error_hint(exc)}", err=True)
            ctx.exit(2)


def os_error_hint(exc: OSError) -> str:
    """The fix an OSError's one-line message suggests, by its errno."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a folder you can write to (this one is read-only or not yours)"
    return "check the path"


STOP: dict = {"signal": None, "told": False}  # the first stop signal received (stop_signals)


def stop_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's kill, `timeout`) both stop a command by raising
    KeyboardInterrupt once, in the main thread; the command's cleanup then runs (an unfinished
    OUT.partial/ removed, its lock released, threads waited for). A second signal while that
    cleanup runs is not raised again (it would abandon the cleanup half-way, leaving the partial
    folder and OUT.lock behind); it is told once that the command is still stopping."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, stop_handler)
    signal.signal(signal.SIGTERM, stop_handler)


def stop_handler(signum, _frame) -> None:
    """The signal handler of stop_signals (also installed for SIGTERM by quantize gptq / awq).
    Within io.writer.signals_held() (publishing an output, importing torch) the first signal is
    kept for when the block ends."""
    from ..io.writer import HOLD

    if STOP["signal"] is None and HOLD["depth"] > 0:
        HOLD["pending"] = HOLD["pending"] or signum
        return
    if STOP["signal"] is not None:
        if not STOP["told"]:
            STOP["told"] = True
            print("still stopping: cleaning up, a moment", file=sys.stderr, flush=True)
        return
    STOP["signal"] = signum
    raise KeyboardInterrupt


def interrupted_line() -> str:
    """The one line a command stopped by Ctrl-C or SIGTERM ends with: what happened to its output."""
    from ..io.writer import PUBLISHED

    how = "terminated (SIGTERM)" if STOP["signal"] == signal.SIGTERM else "interrupted (Ctrl-C)"
    if PUBLISHED:
        return f"{how}: stopped after {PUBLISHED[-1]} was complete; it is kept (inputs untouched)"
    return f"{how}: stopped; an unfinished output was removed and the inputs are untouched; run the command again"


def import_torch() -> None:
    """Import torch (for a command that will need it) with the cyclic garbage collector paused
    and numpy's OpenBLAS on one thread (OPENBLAS_NUM_THREADS=1 unless set), then freeze what exists (gc.freeze:
    never scanned again). Importing torch creates ~10^6 long-lived objects, which set off three
    full collections on the way (~0.1-0.15 s of a streaming command's start-up on the 2-core
    machine) and made every later full collection walk them. The collector is re-enabled after.
    Ctrl-C / SIGTERM during the import take effect once it is done."""
    if "torch" in sys.modules:
        return
    from ..io.writer import signals_held

    with signals_held():  # a stop during the import is taken after it (raised inside, numpy / torch would swallow it half-loaded)
        _import_torch()


def _import_torch() -> None:
    import gc
    import os

    # numpy (which torch imports) starts an OpenBLAS worker thread per extra core that spins for
    # ~0.1 s of CPU right away, taking it from the import on 2 cores; this tool does no numpy
    # linear algebra. An explicit OPENBLAS_NUM_THREADS decides.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        if enabled:
            gc.enable()
    gc.freeze()


def fast_exit(code: object = 0) -> None:
    """End the process as sys.exit(code) would, without the interpreter's teardown.

    Runs the atexit handlers and flushes stdout / stderr first, so what a command printed and
    its exit status are unchanged; what is skipped is finalising every module and object
    (torch's: ~0.3 s after a streaming command on the 2-core machine). Outputs are complete
    before: the writer closes and fsyncs its files and renames the folder. Falls back to
    sys.exit when another non-daemon thread is still running (a normal exit would wait for it)."""
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as sys.exit: the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


def checkpoint_folder(ctx: click.Context, _param: click.Parameter, value):
    """Click callback of every CHECKPOINT argument: a file (a shard, config.json) is refused with
    "pass the checkpoint folder" (io.reader.require_checkpoint_folder, the one shared check), and the
    folder is recorded so that an error about `config.json` names it."""
    if value is None:
        return None
    path = require_checkpoint_folder(value)
    if ctx.obj is not None:
        ctx.obj.setdefault("checkpoints", {}).setdefault(path.resolve(), path)
    return path


def output_folder(_ctx: click.Context, param: click.Parameter, value):
    """Click callback of every output-folder option/argument (`-o OUT`, make-tiny's OUT): a path
    without a folder name of its own (`.`, `..`, `''`, `x/..`) is refused with a one-line error
    (exit 2), since OUT.partial/ is written beside OUT and renamed onto it."""
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    if str(value) == "" or path.name in ("", ".", ".."):
        flag = "OUT" if param.param_type_name == "argument" else "-o"
        raise InputError(f"{flag} {str(value)!r} names no folder of its own (the output is written to a sibling "
                         "OUT.partial/ and renamed); pass a new folder name such as ./out")
    return path


def regexes(_ctx: click.Context, param: click.Parameter, value):
    """Click callback of a repeatable regex option (--only, --skip): each must compile."""
    import re

    for pattern in value or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise click.BadParameter(f"{pattern!r} is not a regular expression ({exc})", param=param) from exc
    return value


def group_size(_ctx: click.Context, param: click.Parameter, value):
    """Click callback of --group-size: a positive number of input features, or -1 (one group per row)."""
    if value is not None and value != -1 and value < 1:
        raise click.BadParameter(f"--group-size {value} is not supported: pass a positive group size (e.g. 128), "
                                 "or -1 for one group per row (gptq)", param=param)
    return value


@contextmanager
def byte_progress(description: str, total: int, enabled: bool = True) -> Iterator[callable]:
    """A rich progress bar over bytes; yields an `advance(nbytes)` callback (its `set_total(nbytes)`
    sets a total known only later).

    The bar appears with the first byte of real work, so input that is refused while it
    is validated ends with just the one-line error; one refused mid-stream (a NaN weight)
    clears the bar, so that too ends with the error line alone."""
    if not enabled:
        yield lambda _n: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=False)
    task = None

    def advance(nbytes: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(description, total=total)
        progress.advance(task, nbytes)

    def set_total(nbytes: int) -> None:  # for work whose size is known only once it is planned
        nonlocal total
        total = nbytes
        if task is not None:
            progress.update(task, total=nbytes)

    advance.set_total = set_total
    failed = False
    try:
        yield advance
    except BaseException:
        failed = True
        raise
    finally:
        if task is not None:
            stop_progress(progress, failed)


def stop_progress(progress, failed: bool) -> None:
    """End a rich progress bar; after a failure leave nothing where the error line follows (on a
    terminal the half bar is cleared; elsewhere rich would print a bare newline)."""
    if not failed:
        progress.stop()
        return
    progress.live.transient = True
    quiet, console.quiet = console.quiet, console.quiet or not console.is_terminal
    try:
        progress.stop()
    finally:
        console.quiet = quiet


def emit_json(value: object) -> None:
    """Print a JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    """1_500_000 -> '1.50M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


@contextmanager
def layer_progress(description: str, total: int, enabled: bool = True) -> Iterator[callable]:
    """A rich progress bar over decoder layers; yields `advance(layers_done)`."""
    if not enabled:
        yield lambda _n: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=False)
    task = None

    def advance(done: int) -> None:
        nonlocal task
        if task is None:  # appears with the first finished layer, after validation
            progress.start()
            task = progress.add_task(description, total=total)
        progress.update(task, completed=done)

    failed = False
    try:
        yield advance
    except BaseException:
        failed = True
        raise
    finally:
        if task is not None:
            stop_progress(progress, failed)


@contextmanager
def pipeline_log(enabled: bool = True) -> Iterator[callable]:
    """A `log(line)` for the calibrated pipeline: `warning:` and `note:` lines go to stderr; `calibration i/n
    samples` lines drive a progress bar over the calibration samples (minutes on a big model)."""
    progress = Progress(TextColumn("[bold]calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"),
                        TimeRemainingColumn(), console=console, transient=False)
    task = None

    def log(line: str) -> None:
        nonlocal task
        if line.startswith(("warning:", "note:")):
            click.echo(line, err=True)
        elif line.startswith("calibration ") and enabled:
            done, total = (int(x) for x in line.split()[1].split("/"))
            if task is None:
                progress.start()
                task = progress.add_task("calibrating", total=total)
            progress.update(task, completed=done)
            if done == total:
                progress.stop()

    failed = False
    try:
        yield log
    except BaseException:
        failed = True
        raise
    finally:
        if task is not None:
            stop_progress(progress, failed)
