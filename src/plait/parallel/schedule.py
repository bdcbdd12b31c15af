"""Pipeline schedules as data, with a validator and an event simulator.

A schedule maps every pipeline rank to the ordered list of compute actions
(forward or backward of one micro-batch through one stage) that it runs.
Sends and receives are implied by the dependencies, never listed:

- F(s, i) for s > 0 needs the activation made by F(s-1, i);
- B(s, i) needs F(s, i) earlier on the same rank and, for s < S-1, the
  gradient made by B(s+1, i).

The executor sends asynchronously and blocks only when the next action's
input has not arrived, which is exactly what `simulate` models, so a schedule
that simulates without deadlock runs without deadlock.

Stages are laid out as in Megatron-LM: rank r holds stages r, r+pp, r+2pp...
This module imports no torch: schedules can be built and checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "forward-only")
# F: forward; B: whole backward; I: backward to the stage's input only; W: its weight gradients.
KINDS = ("F", "B", "I", "W")

Cost = Union[float, Sequence[float]]


@dataclass(frozen=True, order=True)
class Action:
    """One compute step of a micro-batch on a stage: forward ("F"), backward ("B"), or the backward
    split in two: to the stage's input ("I", which sends the gradient on) and to its weights ("W")."""

    stage: int
    microbatch: int
    kind: str

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


class ScheduleError(ValueError):
    """A bad schedule or bad arguments: one summary line, then (for schedules) the grid."""


def num_stages(pp: int, virtual: int = 1) -> int:
    """Number of global stages: `virtual` model chunks on each of `pp` ranks."""
    return pp * virtual


def stage_rank(stage: int, pp: int) -> int:
    """The rank holding `stage` (Megatron's interleaved layout)."""
    return stage % pp


def rank_stages(rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The stages held by `rank`, chunk 0 first: rank, rank+pp, rank+2pp, ..."""
    return [rank + chunk * pp for chunk in range(virtual)]


def _check_args(name: str, pp: int, num_microbatches: int, virtual: int) -> None:
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if pp < 1:
        raise ScheduleError(f"pp must be >= 1 (got {pp})")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be >= 1 (got {num_microbatches})")
    if name == "forward-only":
        if virtual < 1:
            raise ScheduleError(f"forward-only needs virtual >= 1 (got {virtual})")
        return
    if name != "interleaved-1f1b":
        if virtual != 1:
            raise ScheduleError(
                f"{name} runs one stage per rank, so virtual must be 1 (got {virtual}); "
                "use interleaved-1f1b for virtual > 1"
            )
        return
    if virtual < 2:
        raise ScheduleError(
            f"interleaved-1f1b needs virtual >= 2 (got {virtual}); use 1f1b for one stage per rank"
        )
    if num_microbatches % pp:
        # Megatron walks micro-batches through the chunks in groups of pp,
        # so a ragged last group is not supported; suggest the neighbours.
        lower = num_microbatches // pp * pp
        options = [str(n) for n in (lower, lower + pp) if n > 0]
        raise ScheduleError(
            f"interleaved-1f1b needs micro-batches ({num_microbatches}) to be a multiple "
            f"of pp ({pp}); use {' or '.join(options)}"
        )


def _gpipe(rank: int, m: int) -> list[Action]:
    return [Action(rank, i, "F") for i in range(m)] + [Action(rank, i, "B") for i in range(m)]


def _one_f_one_b(rank: int, pp: int, m: int) -> list[Action]:
    # torch's Schedule1F1B: min(m, pp - rank) warm-up forwards (the last of
    # these is what Megatron counts as the first steady-state forward), then
    # B, F, B, F ... while forwards remain, then the remaining backwards.
    warmup = min(m, pp - rank)
    order = [Action(rank, i, "F") for i in range(warmup)]
    for i in range(m):
        order.append(Action(rank, i, "B"))
        if warmup + i < m:
            order.append(Action(rank, warmup + i, "F"))
    return order


def _interleaved(rank: int, pp: int, m: int, virtual: int) -> list[Action]:
    total = m * virtual

    def action(k: int, kind: str) -> Action:
        # The k-th forward (or backward) of this rank: micro-batches move
        # through the chunks in groups of pp; backwards mirror the chunks.
        group, pos = divmod(k, pp * virtual)
        chunk, offset = divmod(pos, pp)
        if kind == "B":
            chunk = virtual - 1 - chunk
        return Action(chunk * pp + rank, group * pp + offset, kind)

    # Megatron's warm-up: enough forwards to keep the ranks after this one
    # busy through all chunks before the first gradient comes back.
    warmup = min(total, (pp - rank - 1) * 2 + (virtual - 1) * pp)
    order = [action(k, "F") for k in range(warmup)]
    for k in range(total - warmup):
        order += [action(warmup + k, "F"), action(k, "B")]
    order += [action(k, "B") for k in range(total - warmup, total)]
    return order


def make_schedule(name: str, pp: int, num_microbatches: int, virtual: int = 1) -> dict[int, list[Action]]:
    """Per-rank ordered compute actions of schedule `name` (one of SCHEDULES).

    Raises ScheduleError, with a one-line fix-it message, on bad arguments.
    """
    _check_args(name, pp, num_microbatches, virtual)
    m = num_microbatches
    if name == "gpipe":
        return {r: _gpipe(r, m) for r in range(pp)}
    if name == "1f1b":
        return {r: _one_f_one_b(r, pp, m) for r in range(pp)}
    if name == "interleaved-1f1b":
        return {r: _interleaved(r, pp, m, virtual) for r in range(pp)}
    # Forward-only (evaluation) works on any layout: each rank goes through its
    # stages in order, all micro-batches each. Every action then depends only on
    # lower (stage, micro-batch) pairs, so no order of ranks can deadlock.
    return {r: [Action(s, i, "F") for s in rank_stages(r, pp, virtual) for i in range(m)] for r in range(pp)}


def theoretical_bubble(name: str, pp: int, num_microbatches: int, virtual: int = 1) -> float:
    """Idle fraction predicted by the usual analysis (equal stage costs, free comms).

    (pp-1)/(m+pp-1) for gpipe, 1f1b and forward-only; interleaving divides the
    fill/drain by `virtual`: (pp-1)/(v*m+pp-1).
    """
    _check_args(name, pp, num_microbatches, virtual)
    work = num_microbatches * (virtual if name == "interleaved-1f1b" else 1)
    return (pp - 1) / (work + pp - 1)


def format_grid(schedule: dict[int, list[Action]], mark: tuple[int, int] | None = None) -> str:
    """Render a schedule as rows "rank 0 | 0F0 0F1 ..."; wrap cell `mark` = (rank, index) in [ ]."""
    width = max((len(str(a)) for acts in schedule.values() for a in acts), default=0)
    label = max((len(str(r)) for r in schedule), default=1)
    rows = []
    for rank in sorted(schedule):
        cells = [str(a).ljust(width) for a in schedule[rank]]
        if mark is not None and mark[0] == rank and 0 <= mark[1] < len(cells):
            cells[mark[1]] = f"[{cells[mark[1]].rstrip()}]"
        rows.append(f"rank {str(rank).rjust(label)} | {' '.join(cells)}".rstrip())
    return "\n".join(rows)


def _fail(summary: str, schedule: dict[int, list[Action]], mark: tuple[int, int] | None = None):
    raise ScheduleError(f"{summary}\n{format_grid(schedule, mark)}")


def validate(
    schedule: dict[int, list[Action]],
    pp: int,
    num_microbatches: int,
    virtual: int = 1,
    forward_only: bool = False,
) -> None:
    """Check that `schedule` is complete and consistent; raise ScheduleError on the first problem."""
    total_stages = num_stages(pp, virtual)
    for rank in range(pp):
        if rank not in schedule:
            _fail(f"rank {rank} missing from schedule (expected ranks 0..{pp - 1})", schedule)
    for rank in sorted(schedule):
        if not 0 <= rank < pp:
            _fail(f"unexpected rank {rank} in schedule (pp={pp})", schedule)
    forwarded: set[tuple[int, int]] = set()
    backwarded: set[tuple[int, int]] = set()  # by B or by I
    weighted: set[tuple[int, int]] = set()  # by W
    split: set[tuple[int, int]] = set()  # backwarded by I (so needing a W), not B
    for rank in range(pp):
        for step, a in enumerate(schedule[rank]):
            where = f"rank {rank} step {step}"
            here = (rank, step)
            if a.kind not in KINDS:
                _fail(f"{where}: unknown kind {a.kind!r} (expected one of {', '.join(KINDS)})", schedule, here)
            if not 0 <= a.stage < total_stages:
                _fail(f"{where}: stage {a.stage} out of range 0..{total_stages - 1}", schedule, here)
            if not 0 <= a.microbatch < num_microbatches:
                _fail(f"{where}: microbatch {a.microbatch} out of range 0..{num_microbatches - 1}",
                      schedule, here)
            if stage_rank(a.stage, pp) != rank:
                _fail(f"{where}: {a} belongs to rank {stage_rank(a.stage, pp)}", schedule, here)
            key = (a.stage, a.microbatch)
            if a.kind == "F":
                if key in forwarded:
                    _fail(f"{where}: duplicate {a}", schedule, here)
                forwarded.add(key)
                continue
            if forward_only:
                _fail(f"{where}: {a} is a backward in a forward-only schedule", schedule, here)
            if a.kind == "W":
                # W takes what I queued: one W per I, after it, and never for a B (which did both).
                if key in weighted:
                    _fail(f"{where}: duplicate {a}", schedule, here)
                if key not in split:
                    _fail(f"{where}: {a} runs before its input backward {a.stage}I{a.microbatch}", schedule, here)
                weighted.add(key)
                continue
            if key in backwarded:
                _fail(f"{where}: duplicate {a}", schedule, here)
            if key not in forwarded:
                _fail(f"{where}: {a} runs before its forward {a.stage}F{a.microbatch}", schedule, here)
            backwarded.add(key)
            if a.kind == "I":
                split.add(key)
    for stage in range(total_stages):
        rank = stage_rank(stage, pp)
        for i in range(num_microbatches):
            if (stage, i) not in forwarded:
                _fail(f"missing {stage}F{i} on rank {rank}", schedule)
            if not forward_only and (stage, i) not in backwarded:
                # Point at the forward whose activations would never be freed.
                step = schedule[rank].index(Action(stage, i, "F"))
                _fail(f"missing {stage}B{i} on rank {rank}", schedule, (rank, step))
            if (stage, i) in split and (stage, i) not in weighted:
                step = schedule[rank].index(Action(stage, i, "I"))
                _fail(f"missing {stage}W{i} on rank {rank}", schedule, (rank, step))


@dataclass
class Simulation:
    """Result of `simulate`: per-rank timeline, makespan, idle fraction and peak memory."""

    timeline: dict[int, list[tuple[float, float, Action]]]
    makespan: float
    bubble: float
    peak_in_flight: dict[int, int]


def _per_stage(cost: Cost, total_stages: int, what: str) -> list[float]:
    if isinstance(cost, (int, float)):
        return [float(cost)] * total_stages
    costs = [float(c) for c in cost]
    if len(costs) != total_stages:
        raise ScheduleError(f"{what} has {len(costs)} entries; expected one per stage ({total_stages})")
    return costs


def _dependencies(a: Action, total_stages: int, grad_kind: dict[tuple[int, int], str] | None = None) -> list[Action]:
    """The actions `a` waits for. `grad_kind[(stage, i)]` says which action ("B" or "I") makes the
    input gradient of that stage and micro-batch (B where not listed)."""
    if a.kind == "F":
        return [Action(a.stage - 1, a.microbatch, "F")] if a.stage > 0 else []
    if a.kind == "W":
        return [Action(a.stage, a.microbatch, "I")]
    deps = [Action(a.stage, a.microbatch, "F")]
    if a.stage < total_stages - 1:
        kind = (grad_kind or {}).get((a.stage + 1, a.microbatch), "B")
        deps.append(Action(a.stage + 1, a.microbatch, kind))
    return deps


def simulate(
    schedule: dict[int, list[Action]],
    pp: int,
    num_microbatches: int,
    virtual: int = 1,
    forward_cost: Cost = 1.0,
    backward_cost: Cost = 2.0,
    comm_cost: float = 0.0,
    input_cost: Cost | None = None,
    weight_cost: Cost | None = None,
) -> Simulation:
    """Run `schedule` on an idealised machine: async sends, a rank waits only for inputs.

    Costs are per action, a float for every stage or a sequence indexed by
    stage; `comm_cost` is added to every dependency that crosses ranks. I and W
    cost `input_cost` and `weight_cost`, by default half of `backward_cost` each. A
    schedule with no backward at all is checked as forward-only.
    """
    forward_only = not any(a.kind != "F" for acts in schedule.values() for a in acts)
    validate(schedule, pp, num_microbatches, virtual, forward_only=forward_only)
    total_stages = num_stages(pp, virtual)
    cost = {"F": _per_stage(forward_cost, total_stages, "forward_cost"),
            "B": _per_stage(backward_cost, total_stages, "backward_cost")}
    half = [c / 2 for c in cost["B"]]
    cost["I"] = _per_stage(input_cost, total_stages, "input_cost") if input_cost is not None else half
    cost["W"] = _per_stage(weight_cost, total_stages, "weight_cost") if weight_cost is not None else half
    grad_kind = {(a.stage, a.microbatch): a.kind for acts in schedule.values() for a in acts if a.kind in ("B", "I")}
    end: dict[Action, float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    timeline: dict[int, list[tuple[float, float, Action]]] = {r: [] for r in range(pp)}
    # A start time depends only on finished actions, so sweeping ranks in any
    # order until nothing moves gives the same timeline as a global clock.
    moved = True
    while moved:
        moved = False
        for rank in range(pp):
            acts = schedule[rank]
            while pos[rank] < len(acts):
                a = acts[pos[rank]]
                deps = _dependencies(a, total_stages, grad_kind)
                if any(d not in end for d in deps):
                    break
                start = max([free[rank]] + [
                    end[d] + (comm_cost if stage_rank(d.stage, pp) != rank else 0.0) for d in deps
                ])
                end[a] = free[rank] = start + cost[a.kind][a.stage]
                timeline[rank].append((start, end[a], a))
                pos[rank] += 1
                moved = True
    blocked = [r for r in range(pp) if pos[r] < len(schedule[r])]
    if blocked:
        waits = []
        for r in blocked:
            a = schedule[r][pos[r]]
            missing = next(d for d in _dependencies(a, total_stages, grad_kind) if d not in end)
            waits.append(f"rank {r} waits at {a} for {missing}")
        _fail("deadlock: " + ", ".join(waits), schedule, (blocked[0], pos[blocked[0]]))
    makespan = max(free)
    busy = sum(e - s for acts in timeline.values() for s, e, _ in acts)
    bubble = 1.0 - busy / (pp * makespan) if makespan > 0 else 0.0
    peak = {}
    for rank in range(pp):
        live = top = 0
        for a in schedule[rank]:
            # A micro-batch's activations are held from F until its B, or its W (which holds
            # the inputs and output gradients of the linear layers until it runs).
            live += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
            top = max(top, live)
        peak[rank] = top
    return Simulation(timeline, makespan, bubble, peak)
