"""Forked worker processes for the Python parts of preparation (plait/data/preparation.py).

The trained BPE's fast path and the counting of the BPE sample's pre-tokens are
Python, held to one core by the GIL; a corpus big enough to be worth it gets one
forked process per core for them (`preparation.POOL_MIN_BYTES`). Forked only on
Linux: macOS's system libraries are not safe to use after a fork.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from typing import Iterator

@contextmanager
def fork_pool(workers: int) -> Iterator:
    """A fork Pool of `workers` processes, terminated on leaving (an error or an interrupt
    too: no worker outlives the preparation)."""
    # tokenizers warns in a child forked after its threads ran; the workers need none of them.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        yield pool
    finally:
        pool.terminate()
