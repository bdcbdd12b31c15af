"""Timing device work honestly: CUDA events on a GPU, the host clock on the CPU.

On the CPU an operation is done when the call returns, so `perf_counter`
around it is its duration. On a GPU the call only queues kernels: the clock
would measure the launch. A `Clock` therefore hands out *marks*: on CUDA an
event recorded on the current stream (it completes when the stream gets
there), on the CPU the time itself. Marks are read only after the work they
bracket is over (`seconds`), which on a GPU waits for the events: the
executor, the gradient sync and the trace take marks inside the step and read
them outside it, so timing adds no host synchronisation to the step.

A collective runs on a stream of its own (NCCL). `mark_done(work)` stamps its
completion without making the compute stream wait: on a GPU a side stream
waits for the work and records the event; on the CPU the work's future
records the time when it completes. Such a mark orders nothing: readers of
the collective's result still wait on its `Work`.
"""

from __future__ import annotations

import time

import torch


class _Later:
    """A CPU mark filled in by a callback when a collective completes."""

    __slots__ = ("at", "future")

    def __init__(self):
        self.at: float | None = None
        self.future = None

    def stamp(self, _fut) -> None:
        self.at = time.perf_counter()

    def read(self) -> float:
        if self.at is None:
            self.future.wait()  # the callback has been scheduled; let it run
        return self.at


class Clock:
    """Marks points in one rank's work on `device`, and measures between them."""

    def __init__(self, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None

    def mark(self):
        """This point of the current stream's work (the host's time on the CPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark_done(self, work):
        """The point at which `work` (an async collective) completes; orders nothing."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._side):
                work.wait()  # makes the side stream, not the compute stream, wait for the collective
                event.record()
            return event
        later = _Later()
        try:
            later.future = work.get_future().then(later.stamp)
        except RuntimeError:  # gloo's reduce-scatter has no future: `waited` stamps it instead
            pass
        return later

    def waited(self, mark) -> None:
        """Call when the work of `mark_done`'s mark has been waited on: a CPU mark that no future
        could stamp takes this time, the first moment its completion was known."""
        if isinstance(mark, _Later) and mark.future is None and mark.at is None:
            mark.at = time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds from mark `start` to mark `end`. On a GPU this waits for both: call it after the step."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return _read(end) - _read(start)


def _read(mark) -> float:
    return mark.read() if isinstance(mark, _Later) else mark
