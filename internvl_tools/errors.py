"""Errors the CLI reports as one line with exit code 2 (bad input), never as a traceback."""


class InputError(Exception):
    """Bad input: a malformed checkpoint, a wrong option, an unsafe output path.

    The message is one line that names the file or key and says how to fix it.
    """


class CheckpointError(InputError):
    """A checkpoint folder, its index or a shard header is malformed."""


class LayoutError(InputError):
    """A key or architecture that the InternVL layout does not know."""
