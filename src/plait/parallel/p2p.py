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
rank gets through and every action's input is received before it runs. It
also checks what NCCL matches on, which is not the tag: between two ranks,
messages in one direction are matched in the order they are posted, so the
sender's order must be the receiver's, and a batch carries at most one
message per direction per peer.

[Note: activation shapes] A receiver allocates its buffer before the data
arrives, so it must know the shape. Before the first step of each input
shape the executor runs a probe along the pipeline (`shape_plan`): each rank
runs its stages on one micro-batch, sends the shape of each output that
crosses to another rank as a small header, and the next rank allocates its
input from it. Every header travels in a batch of its own on both ends, in
stage order, so both ends group and order the messages identically; the
steps themselves then carry data only.

This module imports no torch.
"""

from __future__ import annotations

from bisect import bisect_left

from plait.parallel.schedule import Action, ScheduleError, num_stages, simulate, stage_rank

Message = tuple[str, int, int, int]  # ("act", "grad" or "shape", from stage, to stage, micro-batch)
Op = tuple[str, Message]  # ("send" or "recv", message)
Plan = list[list[list[Op]]]  # per action index (and one past the last): batches to post before it


def messages(a: Action, total_stages: int) -> tuple[Message | None, list[Message]]:
    """The message action `a` needs (None if none) and the messages it makes (I as B; W none)."""
    s, i = a.stage, a.microbatch
    if a.kind == "W":  # weight gradients: nothing comes in, nothing goes out
        return None, []
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


def shape_plan(pp: int, virtual: int = 1) -> dict[int, list]:
    """The shape probe, as each rank's ordered steps: ("run", stage) or a batch of one header op.

    The probe goes once along the stages in order: the rank of stage s runs it
    (on a micro-batch of tokens for stage 0, else on zeros of the received
    shape); a boundary that crosses ranks is one ("shape", s, s+1, 0) message,
    sent and received in a batch of its own.
    """
    total = num_stages(pp, virtual)
    steps: dict[int, list] = {rank: [] for rank in range(pp)}
    for s in range(total):
        here = stage_rank(s, pp)
        if s > 0 and stage_rank(s - 1, pp) != here:
            steps[here].append([("recv", ("shape", s - 1, s, 0))])
        steps[here].append(("run", s))
        if s < total - 1 and stage_rank(s + 1, pp) != here:
            steps[here].append([("send", ("shape", s, s + 1, 0))])
    return steps


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

    check_matching(batches, pp)
    pos = _play(batches, where, pp)
    for rank, seq in batches.items():
        if pos[rank] < len(seq):
            direction, (what, src, dst, i) = next(op for op in seq[pos[rank]]
                                                  if not _other_end_posted(op, where, pos, pp))
            raise ScheduleError(f"deadlock: rank {rank} waits to {direction} the "
                                f"{'activation' if what == 'act' else 'gradient'} of micro-batch {i} "
                                f"from stage {src} to stage {dst}")


def _other_end_posted(op: Op, where: dict[Op, int], pos: dict[int, int], pp: int) -> bool:
    direction, m = op
    peer = _ends(op, pp)[1 if direction == "send" else 0]
    k = where.get(("recv" if direction == "send" else "send", m))
    return k is not None and k <= pos[peer]


def _play(batches: dict[int, list[list[Op]]], where: dict[Op, int], pp: int) -> dict[int, int]:
    """Post batches under the strictest rule (the next only once the current one has finished,
    which needs the other end of each op posted); how far each rank gets."""
    pos = {rank: 0 for rank in batches}
    moved = True
    while moved:
        moved = False
        for rank, seq in batches.items():
            while pos[rank] < len(seq) and all(_other_end_posted(op, where, pos, pp) for op in seq[pos[rank]]):
                pos[rank] += 1
                moved = True
    return pos


def _ends(op: Op, pp: int) -> tuple[int, int]:
    """(sending rank, receiving rank) of an op's message."""
    _, (_, src, dst, _) = op
    return stage_rank(src, pp), stage_rank(dst, pp)


def check_matching(batches: dict[int, list[list[Op]]], pp: int) -> None:
    """Raise ScheduleError unless both ends of every message group and order them alike.

    NCCL matches the point-to-point operations between two ranks in the order
    they are posted (tags play no part): the messages rank a sends to rank b
    must be posted by a in the order b posts their receives. And a batch may
    hold at most one message per direction per peer, so that grouping cannot
    reorder them.
    """
    sent: dict[tuple[int, int], list[Message]] = {}
    got: dict[tuple[int, int], list[Message]] = {}
    for rank, seq in batches.items():
        for k, batch in enumerate(seq):
            seen: set[tuple[str, int]] = set()
            for op in batch:
                direction, m = op
                a, b = _ends(op, pp)
                peer = b if direction == "send" else a
                if (direction, peer) in seen:
                    raise ScheduleError(f"rank {rank}'s batch {k} holds two {direction}s "
                                        f"{'to' if direction == 'send' else 'from'} rank {peer}; "
                                        f"NCCL would match them by position only")
                seen.add((direction, peer))
                (sent if direction == "send" else got).setdefault((a, b), []).append(m)
    for pair in sorted(set(sent) | set(got)):
        ours, theirs = sent.get(pair, []), got.get(pair, [])
        if ours != theirs:
            n = next((k for k, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
            raise ScheduleError(f"rank {pair[0]} sends to rank {pair[1]} in another order than rank {pair[1]} "
                                f"receives: message {n} is {ours[n] if n < len(ours) else 'missing'} on the "
                                f"sender and {theirs[n] if n < len(theirs) else 'missing'} on the receiver")


def check_shape_plan(steps: dict[int, list], pp: int) -> None:
    """Raise ScheduleError unless the shape probe matches on both ends and cannot deadlock."""
    batches = {rank: [item for item in seq if isinstance(item, list)] for rank, seq in steps.items()}
    check_matching(batches, pp)
    where = {op: k for seq in batches.values() for k, batch in enumerate(seq) for op in batch}
    pos = _play(batches, where, pp)
    stuck = [rank for rank, seq in batches.items() if pos[rank] < len(seq)]
    if stuck:
        raise ScheduleError(f"deadlock in the shape probe: rank {stuck[0]} cannot post "
                            f"{batches[stuck[0]][pos[stuck[0]]]}")
