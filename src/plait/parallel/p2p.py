"""When each pipeline rank posts which send and receive: a plan built from the schedule, and its proof.

The executor posts point-to-point operations in batches between actions.
Where the backend runs the operations between two ranks in order on one
stream (NCCL), a batch finishes only once the peer has posted the other end
of each of its operations; batches in a different order on two ranks then
wait on each other forever. gloo matches messages by tag in any order, but
moves data only once its receive is posted.

The plan orders batches by a simulated clock: each message is sent and
received in a batch stamped with the time at which the simulator finishes
the action that makes it. Both ends of every message are thus posted in
batches of the same stamp, and stamps only grow along each rank, so ranks
meet batch for batch. A receive is posted as soon as its data can exist,
which on gloo lets the transfer run while the receiver still computes.
`check_plan` plays the batches under the strictest rule (a rank posts its
next batch only when the current one has finished) and proves that every
rank gets through and every action's input is received before it runs.

This module imports no torch.
"""

from __future__ import annotations

from bisect import bisect_left

from plait.parallel.schedule import Action, ScheduleError, num_stages, simulate, stage_rank

Message = tuple[str, int, int, int]  # ("act" or "grad", from stage, to stage, micro-batch)
Op = tuple[str, Message]  # ("send" or "recv", message)
Plan = list[list[list[Op]]]  # per action index (and one past the last): batches to post before it


def messages(a: Action, total_stages: int) -> tuple[Message | None, list[Message]]:
    """The message action `a` needs (None if none) and the messages it makes."""
    s, i = a.stage, a.microbatch
    if a.kind == "F":
        needs = ("act", s - 1, s, i) if s > 0 else None
        return needs, [("act", s, s + 1, i)] if s < total_stages - 1 else []
    needs = ("grad", s + 1, s, i) if s < total_stages - 1 else None
    return needs, [("grad", s, s - 1, i)] if s > 0 else []


def p2p_plan(schedule: dict[int, list[Action]], pp: int, num_microbatches: int, virtual: int = 1,
             lead: int = 0) -> dict[int, Plan]:
    """For every rank, the batches of sends and receives to post before each of its actions.

    `plan[rank][n]` lists, in order, the batches to post before action n of
    the rank's list; `plan[rank][len(actions)]` those after its last action.
    Messages between stages on the same rank need no operation. With `lead`,
    receives go that many actions earlier, in batches of their own: for gloo,
    whose sends never hold up later operations (so any order is safe), and
    which moves data only once the receive is posted. The proof of
    `check_plan` is for lead 0, the plan for in-order backends.
    """
    total = num_stages(pp, virtual)
    sim = simulate(schedule, pp, num_microbatches, virtual)
    # Batches are keyed by (stamp, kind): with lead 0 a stamp's sends and receives share one
    # batch (kind ""), with a lead its receives move to a batch of their own.
    stamped: dict[int, dict[tuple[float, str], list[Op]]] = {rank: {} for rank in schedule}
    for rank, line in sim.timeline.items():
        for _, end, a in line:
            for m in messages(a, total)[1]:
                to = stage_rank(m[2], pp)
                if to != rank:
                    stamped[rank].setdefault((end, "send" if lead else ""), []).append(("send", m))
                    stamped[to].setdefault((end, "recv" if lead else ""), []).append(("recv", m))
    plan = {}
    for rank, acts in schedule.items():
        starts = [start for start, _, _ in sim.timeline[rank]]
        slots: Plan = [[] for _ in range(len(acts) + 1)]
        for t, kind in sorted(stamped[rank]):
            n = bisect_left(starts, t)  # before the first action starting at t or later
            slots[max(0, n - lead) if kind == "recv" else n].append(stamped[rank][(t, kind)])
        plan[rank] = slots
    return plan


def check_plan(schedule: dict[int, list[Action]], plan: dict[int, Plan], pp: int, virtual: int = 1) -> None:
    """Raise ScheduleError unless `plan` runs `schedule` to the end with in-order point-to-point."""
    total = num_stages(pp, virtual)
    where: dict[Op, int] = {}  # op -> index of its batch in its rank's sequence
    batches: dict[int, list[list[Op]]] = {}
    for rank, slots in plan.items():
        batches[rank] = [batch for slot in slots for batch in slot]
        for k, batch in enumerate(batches[rank]):
            for op in batch:
                where[op] = k
        received: set[Message] = set()
        for n, a in enumerate(schedule[rank]):
            received.update(m for batch in slots[n] for d, m in batch if d == "recv")
            needs = messages(a, total)[0]
            if needs is not None and stage_rank(needs[1], pp) != rank and needs not in received:
                raise ScheduleError(f"rank {rank} runs {a} before it posts the receive of its input")

    def other_end_posted(op: Op, pos: dict[int, int]) -> bool:
        direction, m = op
        peer = stage_rank(m[2] if direction == "send" else m[1], pp)
        k = where.get(("recv" if direction == "send" else "send", m))
        return k is not None and k <= pos[peer]

    pos = {rank: 0 for rank in batches}
    moved = True
    while moved:
        moved = False
        for rank, seq in batches.items():
            while pos[rank] < len(seq) and all(other_end_posted(op, pos) for op in seq[pos[rank]]):
                pos[rank] += 1
                moved = True
    for rank, seq in batches.items():
        if pos[rank] < len(seq):
            direction, (what, src, dst, i) = next(op for op in seq[pos[rank]] if not other_end_posted(op, pos))
            raise ScheduleError(f"deadlock: rank {rank} waits to {direction} the "
                                f"{'activation' if what == 'act' else 'gradient'} of micro-batch {i} "
                                f"from stage {src} to stage {dst}")
