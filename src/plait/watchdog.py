"""Waiting on a peer, and naming the one that stopped answering, on gloo and NCCL alike.

Every wait of the engine goes through `wait(work, describe, peer)`:

- A peer that is gone (its socket closed, its communicator aborted) makes
  `work.wait()` raise; that becomes a `TrainingError` in the engine's terms:
  `rank 0 (dp=0, pp=0) waited 3 s to receive backward gradients of
  micro-batch 0 from rank 2 (dp=0, pp=1): Connection closed by peer`.
- A peer that is alive but silent never completes the work. On gloo,
  `wait()` would block until the process group's timeout; on NCCL it does not
  block the host at all (it only makes the compute stream wait), and NCCL's
  own watchdog later aborts the process with SIGABRT, naming no one. So each
  wait is also handed to a `Watchdog` thread that polls `is_completed()`
  (a query that never blocks) and, once a wait is older than `--timeout`,
  says what this rank was waiting for and from whom, records the silent
  peer in torchelastic's error file (the launcher names it), and exits.

The process group's own timeout is set `GRACE_S` later than the watchdog's
(distributed.init), so plait's message comes first on both backends.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from plait.errors import TrainingError, peer_failure, say

GRACE_S = 10.0  # how much later than plait's deadline the process group's own timeout fires
POLL_S = 0.25

Describe = Callable[[float], str]  # seconds waited -> "rank 0 (dp=0, pp=0) waited 12 s to ..."


class Watchdog:
    """A daemon thread that ends the process when a registered wait outlives `timeout_s`.

    `exit` and `now` are for tests; in a run they are `os._exit` and `time.monotonic`.
    """

    def __init__(self, timeout_s: float, exit: Callable[[int], None] = os._exit,
                 now: Callable[[], float] = time.monotonic, poll_s: float = POLL_S):
        self.timeout_s = timeout_s
        self._exit = exit
        self._now = now
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._waits: list[tuple[object, Describe, int | None, float]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="plait-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, work, describe: Describe, peer: int | None = None) -> None:
        """Hold `work` to the deadline, counted from now (the moment the rank needs its result)."""
        with self._lock:
            self._waits.append((work, describe, peer, self._now()))

    def check(self) -> bool:
        """One pass: drop completed waits; report and exit on the first overdue one. True if one was."""
        now = self._now()
        with self._lock:
            pending = [w for w in self._waits if not w[0].is_completed()]
            self._waits = pending
        for work, describe, peer, since in pending:
            if now - since >= self.timeout_s:
                line = f"{describe(now - since)}: no answer within --timeout {self.timeout_s:g} s"
                say(f"plait: error: {line}")
                _record_for_launcher(line, peer)
                self._exit(1)
                return True
        return False

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            if self.check():
                return


def _record_for_launcher(line: str, peer: int | None) -> None:
    """Leave the failure in torchelastic's error file, where the launcher reads which peer went silent."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": line, "timestamp": int(time.time()), "plait": {"silent_rank": peer}}, fh)
    except OSError:
        pass  # the line on stderr still says it


_ACTIVE: Watchdog | None = None


def start(timeout_s: float) -> Watchdog:
    """Start this process's watchdog (once; a later call replaces the timeout)."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = Watchdog(timeout_s)
        _ACTIVE.start()
    _ACTIVE.timeout_s = timeout_s
    return _ACTIVE


def wait(work, describe: Describe, peer: int | None = None) -> None:
    """Wait for `work`: its result is ordered before what this rank does next (see module doc)."""
    t0 = time.monotonic()
    if _ACTIVE is not None:
        _ACTIVE.watch(work, describe, peer)
    try:
        work.wait()
    except RuntimeError as e:
        raise TrainingError(f"{describe(time.monotonic() - t0)}: {peer_failure(e)}") from None
