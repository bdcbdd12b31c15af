"""Writing files: durable (what a rename makes visible is already on disk), with the usual modes."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(path: str | Path) -> None:
    """Give a file the mode `open()` would have: 0o666 less the process's umask.

    safetensors writes its files 0600 whatever the umask, where the run's other
    files (open(), torch.save) get 0644 under the usual umask 022: the model
    files of a checkpoint or an export would be the only ones the rest of the
    group could not read.
    """
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    # Linux says it in /proc without changing it; os.umask can only read it by setting it,
    # which for a moment affects the files every other thread creates.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
