"""A graceful stop: a signal ends the run after a step every rank agrees on, with a checkpoint.

Clusters stop jobs (a time limit, preemption, maintenance) by sending a signal and, after a
grace period, SIGKILL. `plait train` takes SIGTERM, SIGINT and `--stop-signal` (default
SIGTERM; Slurm users often pick SIGUSR1) as a request to stop:

- In the launcher (the `plait train` that started the workers) the first such signal is
  passed on to this node's workers and the launcher keeps waiting for them; a second, later
  one tears the job down at once (torch's agent: SIGTERM, then SIGKILL).
- In a worker, before its model is built (the data being prepared, say), the signal raises
  `StopRequested`: the work in progress unwinds (data preparation builds in a temporary
  folder that it removes) and nothing is left half-written.
- Afterwards it only sets a flag. The flag rides on the step's one all-reduce, the loss's
  ([Note: stop agreement] in engine.py): every rank reads the same sum after the same step,
  so all stop after that step, whichever rank (or ranks) got the signal. The step loop then
  writes a checkpoint of that step (unless one was just written), waits for any checkpoint
  still being written, and says, on rank 0:
  `stopped at step N on SIGTERM; checkpoint RUN/checkpoints/step-00000N; resume with: plait train --resume RUN`.
- A second signal, more than `window_s` after the first, exits at once (128 + the signal's
  number) without writing anything more. One within the window is the same stop arriving
  twice: Ctrl-C reaches the whole process group, Slurm may signal every process of a step,
  and the launcher passes it on too.

Exit codes: `plait train` returns STOPPED (3) after a graceful stop, in one process and as the
launcher; a worker under a launcher returns 0 (torch's agent would restart a worker that
exits otherwise under --max-restarts), and the launcher tells a stop from a finished run by
whether it passed a stop signal on, or else by the run's checkpoints: a finished run has the
checkpoint of its last step, a stopped one checkpoints short of it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from plait.errors import say

STOPPED = 3  # the exit code of `plait train` after a graceful stop
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")  # what --stop-signal may name


class StopRequested(BaseException):
    """A stop signal arrived while no step loop could act on it (before the model exists).

    A BaseException, as KeyboardInterrupt is: an `except Exception` on the way must not swallow it.
    """

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def signals_for(stop_signal: str) -> list[signal.Signals]:
    """The signals that request a stop: SIGTERM, SIGINT and `stop_signal` (a name in STOP_SIGNALS)."""
    wanted = [signal.SIGTERM, signal.SIGINT, signal.Signals[stop_signal]]
    return list(dict.fromkeys(wanted))


class StopSignals:
    """This process's stop requests: a flag set by the first signal, an exit at a later second one.

    `raising`: while True, the first signal raises StopRequested in the main thread instead of
    only setting the flag (the worker has no step loop yet to act on it).
    """

    def __init__(self, stop_signal: str = "SIGTERM", window_s: float = 2.0):
        self.signals = signals_for(stop_signal)
        self.window_s = window_s
        self.requested: signal.Signals | None = None
        self.raising = False
        self._first = 0.0
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "StopSignals":
        """Take over the stop signals (main thread only); `uninstall` puts the old handlers back."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        sig = signal.Signals(signum)
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first = sig, now
            if self.raising:
                raise StopRequested(sig.name)
            return
        if now - self._first < self.window_s:
            return  # the same stop, arriving a second way (see the module's docstring)
        say(f"plait: stopped at once on a second {sig.name}; no checkpoint written for this stop")
        os._exit(128 + signum)

    @property
    def name(self) -> str:
        return self.requested.name if self.requested is not None else ""


def stopped_short(run_dir: str, steps: int) -> bool:
    """Whether the run in `run_dir` has checkpoints but not the one of its last step, `steps`:
    it stopped (a finished run writes that one; a stop after the model exists writes its own)."""
    done = sorted(Path(run_dir).glob("checkpoints/step-*/manifest.json"))
    return bool(done) and not (Path(run_dir) / "checkpoints" / f"step-{steps:06d}" / "manifest.json").is_file()


def stopped_line(step: int, signal_name: str, checkpoint: str, run_dir: str) -> str:
    """The one line a graceful stop ends with."""
    return (f"stopped at step {step} on {signal_name}; checkpoint {checkpoint}; "
            f"resume with: plait train --resume {run_dir}")


def before_first_step_line(signal_name: str) -> str:
    """The one line of a stop that came before the model existed."""
    return f"stopped before the first step on {signal_name}; nothing was written"
