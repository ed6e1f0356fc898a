"""The `internvl-tools` program (and `python -m internvl_tools`): stop signals are handled from
the first moment, before the CLI's own imports.

Importing the CLI takes about 0.15 s; a Ctrl-C or SIGTERM in that window used to end with a
Python traceback (SIGINT) or no line at all (SIGTERM). Until the command installs its own stop
handling (cli.common.stop_signals), a stop signal ends the program here with one line and exit
130 / 143: nothing has been written yet."""

from __future__ import annotations

import signal
import sys


def _stopped_early(signum, _frame) -> None:
    # the words of cli.common.interrupted_line, written here: importing cli.common (click, rich)
    # is part of the window this covers
    how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    sys.stderr.write(f"{how}: stopped before anything was written; run the command again\n")
    sys.stderr.flush()
    raise SystemExit(128 + signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stopped_early)
    from .main import main as cli_main

    cli_main()
