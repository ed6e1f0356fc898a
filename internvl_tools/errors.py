"""Errors the CLI reports as one line with exit code 2 (bad input), never as a traceback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class InputError(Exception):
    """Bad input: a malformed checkpoint, a wrong option, an unsafe output path.

    The message is one line that names the file or key and says how to fix it.
    """


class CheckpointError(InputError):
    """A checkpoint folder, its index or a shard header is malformed."""


class LayoutError(InputError):
    """A key or architecture that the InternVL layout does not know."""


def name_config(message: str, folder: str | os.PathLike[str]) -> str:
    """A message about `config.json: ...` (raised where only the config dict is known) with the
    checkpoint folder it came from: `FOLDER/config.json: ...`; other messages are returned as they are."""
    if message.startswith("config.json"):
        return f"{os.path.join(os.fspath(folder), 'config.json')}{message[len('config.json'):]}"
    return message


@contextmanager
def about_checkpoint(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an InputError about `config.json` with the checkpoint folder named (see name_config)."""
    try:
        yield
    except InputError as exc:
        named = name_config(str(exc), folder)
        if named == str(exc):
            raise
        raise type(exc)(named) from exc
