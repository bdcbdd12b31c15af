"""Timelines of what each rank did, from the run itself.

With `--trace` every rank records timed events of a few chosen steps —
forward and backward per (stage, micro-batch), waits for a peer's data, each
gradient bucket's all-reduce, the optimizer step, checkpoint writes —
against a clock that all ranks set to zero together (after a barrier; the
spread of the ranks' exit times from a second barrier is the offset
estimate, kept in the trace's metadata). At the end rank 0 gathers them and
writes `trace.json` (Chrome trace events: open in Perfetto or
chrome://tracing, one track per rank) and `pipeline.png`, the measured
pipeline chart above the simulator's prediction for the measured costs.

Times are marks of plait.timing (the host clock on the CPU, CUDA events on a
GPU, where the clock would time kernel launches), read after the run.
Recording costs two marks and a tuple per event, and nothing at all in steps
that are not traced.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from plait.timing import Clock


@dataclass
class Event:
    rank: int
    step: int
    kind: str  # "F", "B", "I", "W", "wait", "allreduce", "optimizer", "checkpoint"
    name: str  # "F3", "B3", "bucket 1", ...
    start: float  # seconds since the aligned zero
    end: float
    stage: int = -1
    microbatch: int = -1


@dataclass
class Recorder:
    """Collects this rank's events for the steps in `steps` (0-based).

    Times are marks of `clock` (plait.timing: CUDA events on a GPU), kept as they
    are during the step and turned into seconds since the aligned zero only when
    the events are read, after the run.
    """

    steps: set[int]
    clock: Clock = field(default_factory=Clock)
    rank: int = 0
    zero: object = 0.0
    step: int = -1
    offset_spread_s: float = 0.0
    _raw: list[tuple] = field(default_factory=list)

    def align(self) -> None:
        """Set this rank's zero together with every other rank's."""
        if dist.is_initialized():
            self.rank = dist.get_rank()
            dist.barrier()
        if self.clock.cuda:
            torch.cuda.synchronize()  # the zero event then completes as the host leaves the barrier
        self.zero = self.clock.mark()
        host_zero = time.perf_counter()
        if dist.is_initialized():  # how far apart the ranks leave a barrier: the clocks' uncertainty
            dist.barrier()
            exits = [None] * dist.get_world_size()
            dist.all_gather_object(exits, time.perf_counter() - host_zero)
            self.offset_spread_s = max(exits) - min(exits)

    def add(self, kind: str, name: str, start, end, stage: int = -1, microbatch: int = -1) -> None:
        """Record an event between two marks of `clock`."""
        if self.step in self.steps:
            self._raw.append((self.step, kind, name, start, end, stage, microbatch))

    @contextlib.contextmanager
    def span(self, kind: str, name: str, stage: int = -1, microbatch: int = -1):
        start = self.clock.mark()
        try:
            yield
        finally:
            self.add(kind, name, start, self.clock.mark(), stage, microbatch)

    @property
    def events(self) -> list[Event]:
        """The recorded events in seconds since the aligned zero (on a GPU, waits for their events)."""
        since = lambda mark: self.clock.seconds(self.zero, mark)  # noqa: E731
        return [Event(self.rank, step, kind, name, since(start), since(end), stage, microbatch)
                for step, kind, name, start, end, stage, microbatch in self._raw]

    def gather(self) -> list[Event] | None:
        """Every rank's events on rank 0 (None elsewhere); a collective call."""
        events = self.events
        if not dist.is_initialized():
            return events
        parts = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(events, parts, dst=0)
        return [e for part in parts for e in part] if parts is not None else None


COMPUTE = ("F", "B", "I", "W")  # the executor's actions: what the bubble is measured against


def traced_steps(total: int, count: int) -> set[int]:
    """The steps to trace: `count` steps after two of warm-up (allocator, caches), within the run."""
    first = min(2, max(0, total - count))
    return set(range(first, min(total, first + count)))


def write_chrome_trace(events: list[Event], path: str | Path, metadata: dict) -> None:
    """Chrome trace event format: complete events ("X"), one process per rank, microseconds."""
    trace = []
    for rank in sorted({e.rank for e in events}):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
    for e in events:
        args = {"step": e.step}
        if e.stage >= 0:
            args.update(stage=e.stage, microbatch=e.microbatch)
        trace.append({"name": e.name, "cat": e.kind, "ph": "X", "pid": e.rank, "tid": 0,
                      "ts": round(e.start * 1e6, 3), "dur": round((e.end - e.start) * 1e6, 3), "args": args})
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms", "metadata": metadata}))
    os.replace(tmp, path)


def step_stats(events: list[Event], step: int, ranks: list[int]) -> dict:
    """For one traced step over `ranks` (one pipeline): its span, each rank's compute time, the
    measured bubble, and the median time of each kind of action (F, B, I, W) on each stage."""
    mine = [e for e in events if e.step == step and e.rank in ranks]
    start = min(e.start for e in mine if e.kind in COMPUTE)
    end = max(e.end for e in mine if e.kind in COMPUTE)
    busy = {r: sum(e.end - e.start for e in mine if e.rank == r and e.kind in COMPUTE) for r in ranks}
    costs: dict[tuple[str, int], list[float]] = {}
    for e in mine:
        if e.kind in COMPUTE:
            costs.setdefault((e.kind, e.stage), []).append(e.end - e.start)
    return {"start": start, "end": end, "busy": busy,
            "bubble": 1 - sum(busy.values()) / (len(ranks) * (end - start)),
            "cost": {k: statistics.median(v) for k, v in costs.items()}}


def write_outputs(events: list[Event], run_dir: str | Path, schedule: str, dp: int, pp: int,
                  microbatches: int, virtual: int, metadata: dict) -> dict:
    """trace.json and pipeline.png for a traced run; returns the figures for the run's summary."""
    from plait.charts import Box, boxes_from_simulation, draw_pipeline
    from plait.parallel.schedule import make_schedule, schedule_layout, simulate, theoretical_bubble

    run_dir = Path(run_dir)
    write_chrome_trace(events, run_dir / "trace.json", metadata)
    step = max(e.step for e in events)
    # One pipeline: the first data-parallel replica's ranks (with pp = 1, every replica).
    rows = [pp_rank * dp for pp_rank in range(pp)] if pp > 1 else sorted({e.rank for e in events})
    stats = step_stats(events, step, rows)
    t0 = stats["start"]
    measured = [Box(rows.index(e.rank), e.start - t0, e.end - t0, e.kind,
                    str(e.microbatch) if e.kind in COMPUTE else "", max(e.stage, 0) // pp)
                for e in events if e.step == step and e.rank in rows and e.end > t0]
    num_stages = pp * virtual
    cost = stats["cost"]
    fwd = [cost.get(("F", s), 0.0) for s in range(num_stages)]
    # A split schedule runs I and W instead of B (but on stage 0: zero_bubble.whole_first_stage;
    # dualpipev runs both on one stage): the simulation takes the measured costs of what each
    # stage ran, and a B no stage ran costs its I and W.
    split = [("I", s) in cost for s in range(num_stages)]
    inp = [cost.get(("I", s), 0.0) for s in range(num_stages)] if any(split) else None
    wgt = [cost.get(("W", s), 0.0) for s in range(num_stages)] if any(split) else None
    bwd = [cost[("B", s)] if ("B", s) in cost else inp[s] + wgt[s] if split[s] else 0.0 for s in range(num_stages)]
    # Rows carry the rank numbers of the job (as the `ranks:` line and trace.json do), not row numbers.
    row_labels = [f"rank {r} (dp={r % dp}, pp={r // dp})" for r in rows]
    which = ("" if dp == 1 else f", all {dp} replicas" if pp == 1
             else f", replica 0 (ranks {', '.join(map(str, rows))})")
    panels = [(f"measured: step {step + 1}{which}", measured, "s")]
    sim_bubble = None
    if pp > 1 and all(fwd) and all(bwd) and all(inp[s] and wgt[s] for s in range(num_stages) if split[s]):
        sim = simulate(make_schedule(schedule, pp, microbatches, virtual), pp, microbatches, virtual,
                       forward_cost=fwd, backward_cost=bwd, input_cost=inp, weight_cost=wgt,
                       layout=schedule_layout(schedule))
        sim_bubble = sim.bubble
        panels.append(("simulated with the measured stage costs", boxes_from_simulation(sim, virtual), "s"))
    theory = theoretical_bubble(schedule, pp, microbatches, virtual) if pp > 1 else 0.0
    title = (f"{schedule if pp > 1 else 'data parallel'}, dp={dp} x pp={pp}, {microbatches} micro-batches: "
             f"bubble {stats['bubble']:.3f} measured"
             + (f", {sim_bubble:.3f} simulated" if sim_bubble is not None else "") + f", {theory:.3f} theory")
    draw_pipeline(panels, run_dir / "pipeline.png", title, num_ranks=len(rows), row_labels=row_labels)
    ranks = {}
    for r in sorted({e.rank for e in events}):
        mine = [e for e in events if e.step == step and e.rank == r]
        span = max(e.end for e in mine) - min(e.start for e in mine)
        compute = sum(e.end - e.start for e in mine if e.kind in (*COMPUTE, "optimizer"))
        comm = sum(e.end - e.start for e in mine if e.kind == "wait")
        ranks[str(r)] = {"compute": compute / span, "comm": comm / span, "idle": max(0.0, 1 - (compute + comm) / span)}
    return {"traced_step": step + 1, "step_s": stats["end"] - stats["start"], "bubble_measured": stats["bubble"],
            "ranks": ranks,
            "bubble_simulated": sim_bubble, "bubble_theory": theory,
            "compute_s": {str(r): v for r, v in stats["busy"].items()},
            "clock_spread_s": metadata.get("clock_spread_s")}
