"""A cheap fingerprint of a corpus's files: what the cache key is made of.

[Note: the corpus fingerprint]
Hashing every byte of a large corpus on every start would cost as much as
reading it. The fingerprint instead covers, for each file in reading order:
its path relative to the corpus root, its size, its modification time (ns),
and SAMPLE_BYTES read at its start, middle and end. So:
- adding, removing, renaming or resizing a file, or editing any byte within
  the sampled spans, gives a new key: the corpus is prepared again;
- touching a file (a new mtime, same bytes) also gives a new key: a needless
  but harmless re-preparation, as after copying a corpus without its times;
- an edit that keeps a file's size and mtime and misses the sampled spans is
  not seen. Tools that write files set the mtime, so this takes a deliberate
  `touch -d`; delete the prepared folder (or its cache) after such a change.
Moving the corpus's root folder keeps the key (paths are relative).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from plait.errors import DataError

SAMPLE_BYTES = 1024


def fingerprint(files: Sequence[Path], root: Path | None = None) -> str:
    """The hex sha256 of the files' names, sizes, mtimes and sampled bytes (see the note)."""
    h = hashlib.sha256()
    # Relative names by cutting the root's prefix off, not Path.relative_to (several
    # microseconds a file): this runs on every start, over every file of the corpus.
    prefix = str(root) + os.sep if root is not None and root.is_dir() else None
    for path in files:
        text = str(path)
        if prefix is None:
            name = path.name
        elif text.startswith(prefix):
            name = text[len(prefix):].replace(os.sep, "/")
        else:
            name = path.relative_to(root).as_posix()
        try:
            # A raw descriptor and pread: no buffered file object per file, which costs
            # more than the three small reads.
            fd = os.open(text, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                h.update(json.dumps([name, st.st_size, st.st_mtime_ns]).encode())
                middle, end = st.st_size // 2 - SAMPLE_BYTES // 2, st.st_size - SAMPLE_BYTES
                for start in sorted({0, max(0, middle), max(0, end)}):
                    h.update(os.pread(fd, SAMPLE_BYTES, start))
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"--data {path}: cannot read it ({e.strerror}); check its permissions") from None
    return h.hexdigest()
