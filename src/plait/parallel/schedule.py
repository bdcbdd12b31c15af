"""Pipeline schedules as data, with a validator and an event simulator.

A schedule maps every pipeline rank to the ordered list of compute actions
(forward or backward of one micro-batch through one stage) that it runs.
A backward is either one B, or split in two as the zero-bubble schedules do:
I, the gradient to the stage's input (what the previous stage waits for), and
W, the gradients of the stage's weights (what nobody waits for).
Sends and receives are implied by the dependencies, never listed:

- F(s, i) for s > 0 needs the activation made by F(s-1, i);
- B(s, i) and I(s, i) need F(s, i) earlier on the same rank and, for
  s < S-1, the gradient made by B(s+1, i) or I(s+1, i);
- W(s, i) needs I(s, i) earlier on the same rank, and sends nothing.

The executor sends asynchronously and blocks only when the next action's
input has not arrived, which is exactly what `simulate` models, so a schedule
that simulates without deadlock runs without deadlock.

Stages are laid out as in Megatron-LM ("loop"): rank r holds stages r, r+pp,
r+2pp...; zbv and dualpipev use the "v" layout instead, where rank r holds stages r and
2pp-1-r (`schedule_layout` says which a schedule needs). Every function that
places stages takes `layout`, "loop" by default.
This module imports no torch: schedules can be built and checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb1p", "zbv", "dualpipev", "forward-only")
V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V
LAYOUTS = ("loop", "v")
KINDS = ("F", "B", "I", "W")

Cost = Union[float, Sequence[float]]


@dataclass(frozen=True, order=True)
class Action:
    """One compute step of a micro-batch on a stage: forward ("F"), backward ("B"), or a backward
    split into its input gradient ("I") and its weight gradients ("W")."""

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


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ScheduleError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def stage_rank(stage: int, pp: int, layout: str = "loop") -> int:
    """The rank holding `stage`.

    "loop" (Megatron's interleaved layout): stage % pp. "v": chunks of pp stages
    go down the ranks and back up in turn, so with two chunks rank r holds
    stages r and 2pp-1-r (the last rank runs stages pp-1 and pp back to back,
    and rank 0 holds both the first and the last stage).
    """
    _check_layout(layout)
    chunk, offset = divmod(stage, pp)
    return pp - 1 - offset if layout == "v" and chunk % 2 else offset


def rank_stages(rank: int, pp: int, virtual: int = 1, layout: str = "loop") -> list[int]:
    """The stages held by `rank`, chunk 0 first: rank, rank+pp, ... ("loop"), or rank,
    2pp-1-rank, ... ("v")."""
    _check_layout(layout)
    return [chunk * pp + (pp - 1 - rank if layout == "v" and chunk % 2 else rank) for chunk in range(virtual)]


def schedule_layout(name: str) -> str:
    """The stage layout schedule `name` runs on: "v" for zbv and dualpipev, "loop" for the others.

    Callers that place stages (the Engine, the memory plan, the p2p plan) pass
    it on as `layout`. forward-only runs on either layout: give it the layout
    of the schedule the model was trained with.
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return "v" if name in V_SCHEDULES else "loop"


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
    if name in V_SCHEDULES:
        if virtual != 2:
            raise ScheduleError(f"{name} runs two stages per rank in a V, so virtual must be 2 (got {virtual}); "
                                "use virtual 2, or zb1p for one stage per rank")
        if name == "dualpipev" and num_microbatches < 2 * pp:
            raise ScheduleError(f"dualpipev needs at least 2 x pp = {2 * pp} micro-batches (got {num_microbatches}); "
                                f"use {2 * pp} or more, or zbv for fewer")
        return
    if name != "interleaved-1f1b":
        if virtual != 1:
            other = "zbv for virtual = 2" if name == "zb1p" else "interleaved-1f1b for virtual > 1"
            raise ScheduleError(f"{name} runs one stage per rank, so virtual must be 1 (got {virtual}); use {other}")
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


def make_schedule(name: str, pp: int, num_microbatches: int, virtual: int = 1,
                  layout: str | None = None) -> dict[int, list[Action]]:
    """Per-rank ordered compute actions of schedule `name` (one of SCHEDULES).

    `layout` places the stages of forward-only, which runs on either ("loop"
    by default; "v" to evaluate a model trained with zbv). Every other schedule
    has its own layout (`schedule_layout`); passing another is refused.
    Raises ScheduleError, with a one-line fix-it message, on bad arguments.
    """
    _check_args(name, pp, num_microbatches, virtual)
    own = schedule_layout(name)
    if layout is None:
        layout = own
    _check_layout(layout)
    if name != "forward-only" and layout != own:
        raise ScheduleError(f"{name} runs on the {own!r} layout, not {layout!r}; leave layout out")
    m = num_microbatches
    if name == "gpipe":
        return {r: _gpipe(r, m) for r in range(pp)}
    if name == "1f1b":
        return {r: _one_f_one_b(r, pp, m) for r in range(pp)}
    if name == "interleaved-1f1b":
        return {r: _interleaved(r, pp, m, virtual) for r in range(pp)}
    if name in ("zb1p", "zbv", "dualpipev"):
        # Imported here: zero_bubble builds on this module's Action.
        from plait.parallel import zero_bubble

        order = getattr(zero_bubble, name)
        return {r: zero_bubble.whole_first_stage(order(r, pp, m)) for r in range(pp)}
    # Forward-only (evaluation) works on any layout: each rank goes through its
    # stages in order, all micro-batches each. Every action then depends only on
    # lower (stage, micro-batch) pairs, so no order of ranks can deadlock.
    return {r: [Action(s, i, "F") for s in rank_stages(r, pp, virtual, layout) for i in range(m)]
            for r in range(pp)}


def theoretical_bubble(name: str, pp: int, num_microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of the step predicted by the usual analysis (equal stage costs, free comms).

    With F the forward's cost and 1F1B's backward B = 2F (I = W = F when split):
    - gpipe, 1f1b, forward-only: (pp-1)/(m+pp-1);
    - interleaved-1f1b divides the fill and drain by `virtual`: (pp-1)/(v*m+pp-1);
    - zb1p: for m >= pp each rank idles (pp-1)(F+I-W) = (pp-1)F, a third of 1F1B's
      (pp-1)(F+I+W), beside 3mF of work: (pp-1)/(3m+pp-1) (Qi et al. 2024, ZB-H1). With
      m < pp every W is held back on the last rank, whose last I then ends at pp-1+2m, and
      each rank idles pp-m more: d = pp-1+max(0, pp-m), bubble d/(3m+d);
    - zbv: the zero-bubble repository gives 0 for the steady state. What remains at
      m >= 2pp-1 is the fill that no schedule avoids, the pp-1 chunk forwards before the
      last rank's first input arrives, beside 6m chunk actions per rank: (pp-1)/(6m+pp-1).
      Below that the orders are cut short (see zero_bubble.zbv) and each rank idles
      d = max(pp-1, 2(2pp-1-m)) chunk actions, as the simulator gives: bubble d/(6m+d).
    - dualpipev (m >= 2pp): the same fill and nothing else, (pp-1)/(6m+pp-1), its pairs of a
      forward and a backward run one after the other. DualPipe's own gain, overlapping the
      two, is not in these costs (see zero_bubble.dualpipev).
    These are fractions of the whole step, as `simulate` measures it. The repository's
    "bubble rate" divides the idle time by the work instead, (pp-1)/3m for zb1p against
    1F1B's (pp-1)/m: exactly a third. As fractions of the step the ratio is a little
    above a third, (m+pp-1)/(3m+pp-1).
    """
    _check_args(name, pp, num_microbatches, virtual)
    m = num_microbatches
    if name == "zb1p":
        idle = pp - 1 + max(0, pp - m)
        return idle / (3 * m + idle)
    if name in V_SCHEDULES:
        idle = max(pp - 1, 2 * (2 * pp - 1 - m))  # dualpipev's m >= 2pp: pp - 1
        return idle / (6 * m + idle)
    work = m * (virtual if name == "interleaved-1f1b" else 1)
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
    layout: str = "loop",
) -> None:
    """Check that `schedule` is complete and consistent; raise ScheduleError on the first problem.

    Every (stage, micro-batch) has one F on the stage's rank (under `layout`)
    and, unless `forward_only`, either one B after it or one I after it and one
    W after that I; never B beside I or W for the same pair.
    """
    _check_layout(layout)
    total_stages = num_stages(pp, virtual)
    for rank in range(pp):
        if rank not in schedule:
            _fail(f"rank {rank} missing from schedule (expected ranks 0..{pp - 1})", schedule)
    for rank in sorted(schedule):
        if not 0 <= rank < pp:
            _fail(f"unexpected rank {rank} in schedule (pp={pp})", schedule)
    done: dict[str, set[tuple[int, int]]] = {kind: set() for kind in KINDS}
    for rank in range(pp):
        for step, a in enumerate(schedule[rank]):
            where = f"rank {rank} step {step}"
            here = (rank, step)
            if a.kind not in KINDS:
                _fail(f"{where}: unknown kind {a.kind!r} (expected 'F', 'B', 'I' or 'W')", schedule, here)
            if not 0 <= a.stage < total_stages:
                _fail(f"{where}: stage {a.stage} out of range 0..{total_stages - 1}", schedule, here)
            if not 0 <= a.microbatch < num_microbatches:
                _fail(f"{where}: microbatch {a.microbatch} out of range 0..{num_microbatches - 1}",
                      schedule, here)
            owner = stage_rank(a.stage, pp, layout)
            if owner != rank:
                _fail(f"{where}: {a} belongs to rank {owner}", schedule, here)
            key = (a.stage, a.microbatch)
            if key in done[a.kind]:
                _fail(f"{where}: duplicate {a}", schedule, here)
            if a.kind != "F":
                if forward_only:
                    _fail(f"{where}: {a} is a backward in a forward-only schedule", schedule, here)
                if key not in done["F"]:
                    _fail(f"{where}: {a} runs before its forward {a.stage}F{a.microbatch}", schedule, here)
                # A B is the I and the W merged: the two forms never share a pair.
                other = [k for k in (("I", "W") if a.kind == "B" else ("B",)) if key in done[k]]
                if other:
                    _fail(f"{where}: {a} after {a.stage}{other[0]}{a.microbatch}: a micro-batch's backward on a "
                          f"stage is one B, or one I and one W", schedule, here)
                if a.kind == "W" and key not in done["I"]:
                    _fail(f"{where}: {a} runs before its input gradient {a.stage}I{a.microbatch}", schedule, here)
            done[a.kind].add(key)
    for stage in range(total_stages):
        rank = stage_rank(stage, pp, layout)
        for i in range(num_microbatches):
            if (stage, i) not in done["F"]:
                _fail(f"missing {stage}F{i} on rank {rank}", schedule)
            if forward_only or (stage, i) in done["B"] or (stage, i) in done["W"]:
                continue
            if (stage, i) in done["I"]:
                # Point at the I whose weight gradients would never be made.
                step = schedule[rank].index(Action(stage, i, "I"))
                _fail(f"missing {stage}W{i} on rank {rank}", schedule, (rank, step))
            # Point at the forward whose activations would never be freed.
            step = schedule[rank].index(Action(stage, i, "F"))
            _fail(f"missing {stage}B{i} on rank {rank}", schedule, (rank, step))


@dataclass
class Simulation:
    """Result of `simulate`: per-rank timeline, makespan, idle fraction and peak memory.

    `peak_in_flight[rank]` counts (stage, micro-batch) pairs live at once: from
    the F until the B, or until the W of a split backward.
    """

    timeline: dict[int, list[tuple[float, float, Action]]]
    makespan: float
    bubble: float
    peak_in_flight: dict[int, int]

    @property
    def idle(self) -> float:
        """Idle time summed over the ranks: pp x makespan less the busy time (exact for integer costs)."""
        return len(self.timeline) * self.makespan - sum(e - s for acts in self.timeline.values() for s, e, _ in acts)


def _per_stage(cost: Cost, total_stages: int, what: str) -> list[float]:
    if isinstance(cost, (int, float)):
        return [float(cost)] * total_stages
    costs = [float(c) for c in cost]
    if len(costs) != total_stages:
        raise ScheduleError(f"{what} has {len(costs)} entries; expected one per stage ({total_stages})")
    return costs


def _dependencies(a: Action, total_stages: int, split: set[tuple[int, int]]) -> list[Action]:
    """The actions `a` waits for; `split` holds the (stage, micro-batch) pairs whose backward is I and W."""
    if a.kind == "F":
        return [Action(a.stage - 1, a.microbatch, "F")] if a.stage > 0 else []
    if a.kind == "W":
        return [Action(a.stage, a.microbatch, "I")]
    deps = [Action(a.stage, a.microbatch, "F")]
    if a.stage < total_stages - 1:
        # The gradient comes from the next stage's I where that stage splits its backward.
        nxt = (a.stage + 1, a.microbatch)
        deps.append(Action(*nxt, "I" if nxt in split else "B"))
    return deps


def simulate(
    schedule: dict[int, list[Action]],
    pp: int,
    num_microbatches: int,
    virtual: int = 1,
    forward_cost: Cost = 1.0,
    backward_cost: Cost | None = None,
    comm_cost: float = 0.0,
    *,
    input_cost: Cost | None = None,
    weight_cost: Cost | None = None,
    layout: str = "loop",
    action_cost: Mapping[Action, float] | None = None,
) -> Simulation:
    """Run `schedule` on an idealised machine: async sends, a rank waits only for inputs.

    Costs are per action, a float for every stage or a sequence indexed by
    stage: `backward_cost` for a B, `input_cost` for an I and `weight_cost` for
    a W. Left out, a B costs I + W where both are given (the zero-bubble orders
    run stage 0's backward whole), else 2; and an I or a W half of the stage's
    B. `comm_cost` is added
    to every dependency that crosses ranks (under `layout`). A schedule with no
    backward at all is checked as forward-only. `action_cost` gives each action
    its own time instead (a replay of a measured step: every action of
    `schedule`, as the executor timed it).
    """
    forward_only = not any(a.kind != "F" for acts in schedule.values() for a in acts)
    validate(schedule, pp, num_microbatches, virtual, forward_only=forward_only, layout=layout)
    total_stages = num_stages(pp, virtual)
    inp = None if input_cost is None else _per_stage(input_cost, total_stages, "input_cost")
    wgt = None if weight_cost is None else _per_stage(weight_cost, total_stages, "weight_cost")
    if backward_cost is not None:
        backward = _per_stage(backward_cost, total_stages, "backward_cost")
    elif inp is not None and wgt is not None:
        backward = [i + w for i, w in zip(inp, wgt)]
    else:
        backward = [2.0] * total_stages
    half = [b / 2 for b in backward]
    cost = {"F": _per_stage(forward_cost, total_stages, "forward_cost"), "B": backward,
            "I": half if inp is None else inp, "W": half if wgt is None else wgt}
    split = {(a.stage, a.microbatch) for acts in schedule.values() for a in acts if a.kind == "I"}
    if action_cost is not None:
        missing = [str(a) for acts in schedule.values() for a in acts if a not in action_cost]
        if missing:
            raise ScheduleError(f"action_cost has no time for {', '.join(missing)}")
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
                deps = _dependencies(a, total_stages, split)
                if any(d not in end for d in deps):
                    break
                start = max([free[rank]] + [
                    end[d] + (comm_cost if stage_rank(d.stage, pp, layout) != rank else 0.0) for d in deps
                ])
                end[a] = free[rank] = start + (cost[a.kind][a.stage] if action_cost is None else action_cost[a])
                timeline[rank].append((start, end[a], a))
                pos[rank] += 1
                moved = True
    blocked = [r for r in range(pp) if pos[r] < len(schedule[r])]
    if blocked:
        waits = []
        for r in blocked:
            a = schedule[r][pos[r]]
            missing = next(d for d in _dependencies(a, total_stages, split) if d not in end)
            waits.append(f"rank {r} waits at {a} for {missing}")
        _fail("deadlock: " + ", ".join(waits), schedule, (blocked[0], pos[blocked[0]]))
    makespan = max(free)
    busy = sum(e - s for acts in timeline.values() for s, e, _ in acts)
    bubble = 1.0 - busy / (pp * makespan) if makespan > 0 else 0.0
    peak = {}
    for rank in range(pp):
        live = top = 0
        for a in schedule[rank]:
            # I frees part of the activations, but W still holds the matmuls' inputs and output
            # gradients, about as much again (see memory.peak_in_flight): live until its W.
            live += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
            top = max(top, live)
        peak[rank] = top
    return Simulation(timeline, makespan, bubble, peak)
