"""The two kinds of failure the command line distinguishes.

Anything raised as a `PlaitError` reaches the user as one line on stderr, with
no traceback; its `exit_code` says whether the input was bad (2) or the run
failed (1).
"""

import sys


def say(line: str) -> None:
    """Write one line to stderr in a single write.

    `print(..., file=sys.stderr)` writes the text and the newline in two calls,
    so the lines of several workers sharing one stderr can run together.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class PlaitError(Exception):
    """A failure plait explains in one line.

    `shared=True` marks an error that every rank of a job raises alike (a
    check of the layout, a decision broadcast from rank 0): only rank 0 prints it.
    """

    exit_code = 1

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared


class ConfigError(PlaitError):
    """Bad input: an option, a config file, a data path. Exit code 2."""

    exit_code = 2


class DataError(ConfigError):
    """Bad input data: a missing path, a corpus too short for one sequence."""


class TrainingError(PlaitError):
    """The run itself failed (a NaN loss, a lost worker). Exit code 1."""


def peer_failure(e: BaseException) -> str:
    """The gist of a communication error from gloo or NCCL, without source paths and advice."""
    import re

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:537] Read error ..." -> "Read error ..."
    return text.split(". This is typically")[0]
