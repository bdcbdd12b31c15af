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
POLL_S = 0.25  # how often completed waits are dropped (deadlines themselves are kept to the millisecond)
COLLECTIVE_DELAY_S = 1.0  # see [Note: naming the silent rank]

Describe = Callable[[float], str]  # seconds waited -> "rank 0 (dp=0, pp=0) waited 12 s to ..."


class Watchdog:
    """A daemon thread that ends the process when a registered wait outlives `timeout_s`.

    [Note: naming the silent rank] The first rank to time out is often not
    waiting on the silent one: in a pipeline the first stage waits on the
    second, which waits on the third, which waits on the stopped fourth. So a
    wait that is half-way to its deadline is published in the job's store
    ("rank 1 waits on rank 2"), and the rank that times out follows those
    links from its own peer to a rank that waits on no one: that one stopped
    answering. A collective has no single peer to follow, so a wait in one
    reports a second late, leaving the word to the waits that can name a peer.

    `store`, `exit` and `now` are for tests; in a run they are the process
    group's store, `os._exit` and `time.monotonic`.
    """

    def __init__(self, timeout_s: float, rank: int = 0, store=None, exit: Callable[[int], None] = os._exit,
                 now: Callable[[], float] = time.monotonic, poll_s: float = POLL_S):
        self.timeout_s = timeout_s
        self.rank = rank
        self.store = store
        self._exit = exit
        self._now = now
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._waits: list[list] = []  # [work, describe, peer, since, published]
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
            self._waits.append([work, describe, peer, self._now(), False])

    def _deadline(self, entry) -> float:
        return entry[3] + self.timeout_s + (COLLECTIVE_DELAY_S if entry[2] is None else 0.0)

    def check(self) -> float:
        """One pass: drop completed waits, publish old ones, report and exit on an overdue one.

        Returns how long to sleep before the next pass.
        """
        now = self._now()
        with self._lock:
            finished = [w[0].is_completed() for w in self._waits]
            done = [w for w, f in zip(self._waits, finished) if f]
            self._waits = [w for w, f in zip(self._waits, finished) if not f]
            pending = list(self._waits)
        if any(w[4] for w in done) and not any(w[4] for w in pending):  # a slow wait ended: unpublish it
            self.store.delete_key(f"plait-waits/{self.rank}")
        for entry in pending:
            work, describe, peer, since, published = entry
            if now >= self._deadline(entry):
                silent = self._follow(peer) if peer is not None else None
                line = f"{describe(now - since)}: no answer within --timeout {self.timeout_s:g} s"
                say(f"plait: error: {line}")
                _record_for_launcher(line, silent)
                self._exit(1)
                return self._poll_s
            if peer is not None and not published and now - since >= self.timeout_s / 2 and self.store is not None:
                self.store.set(f"plait-waits/{self.rank}", str(peer))
                entry[4] = True
        deadlines = [self._deadline(w) for w in pending]
        return max(0.0, min([self._poll_s, *(d - now for d in deadlines)]))

    def _follow(self, peer: int) -> int:
        """The rank at the end of the published waits from `peer` (see the Note)."""
        seen = {self.rank}
        while peer not in seen and self.store is not None:
            seen.add(peer)
            key = f"plait-waits/{peer}"
            try:
                if not self.store.check([key]):
                    break
                peer = int(self.store.get(key))
            except Exception:  # noqa: BLE001 - the store itself may be gone; name what we know
                break
        return peer

    def _run(self) -> None:
        while not self._stop.wait(self.check()):
            pass


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
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        _ACTIVE = Watchdog(timeout_s, rank=dist.get_rank() if dist.is_initialized() else 0, store=store)
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
