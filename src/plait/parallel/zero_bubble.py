"""The zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): per-rank action lists.

Both split each backward into I (the gradient to the stage's input, which the
previous stage waits for) and W (the weight gradients, which nobody waits
for), and move the W's into the gaps where 1F1B's ranks sit idle. Both are
built by hand, phase by phase, as closed-form orders, not by a greedy
list-scheduler over the simulator: a hand-built order is the published one,
reads in a grid phase by phase, and does not change with the costs, so the
executor, the p2p plan and every rank agree on it without profiling. What the
costs change is only how well it fits, which `simulate` shows.

- `zb1p` (ZB-H1): one stage per rank, Megatron's layout; the sections of the
  authors' ZB-H1 (warm-up, F+I, F+I+W, I+W, W), written anew.
- `zbv` (ZB-V): two stages per rank in a V, rank r holding stages r and 2p-1-r;
  the same order as torch's ScheduleZBVZeroBubble (tests compare the two).
- `dualpipev` (DeepSeek's DualPipeV): the same V, ordered so that a forward and a
  backward of the two stages come in pairs; the same order as torch's
  ScheduleDualPipeV (tests compare the two).

`make_schedule` then runs each through `whole_first_stage`: stage 0's I and W,
back to back in every order, become one B (its docstring says why).

The peak memory zb1p and zbv promise is 1F1B's peak over the pipeline, p micro-batches
live (from F to W) on a rank, which 1F1B reaches on rank 0 only: later ranks
hold more than under 1F1B, up to that same p. dualpipev holds one stage's share
more on every rank, p + 1/2: in its steady state each forward runs before the
backward it pairs with, on top of zbv's p. No schedule can hold each rank to
1F1B's own count and still cut the bubble to a third: with one micro-batch live
the last rank runs F, I, W, F, I, W... back to back, its last I ends at 3m+p-2
(unit costs), the gradient still has p-1 I's to cross and rank 0 a W after
them, so the step takes 3m+2p-2, two thirds of 1F1B's idle time, not one.

This module imports no torch.
"""

from __future__ import annotations

from collections import deque

from plait.parallel.schedule import Action


class _Rank:
    """One rank's order under construction: per stage, the next micro-batch of each kind and the
    micro-batches whose I has run but whose W has not (oldest first)."""

    def __init__(self) -> None:
        self.order: list[Action] = []
        self.next: dict[tuple[int, str], int] = {}
        self.waiting: dict[int, deque[int]] = {}
        self.split: deque[int] = deque()  # the stage of each I whose W has not run, oldest first

    def run(self, stage: int, kind: str) -> None:
        """Append the next F, B or I of `stage`, or the W of its oldest micro-batch awaiting one.

        B and I share one count: a micro-batch's backward is one or the other."""
        if kind == "W":
            i = self.waiting[stage].popleft()
            self.split.remove(stage)
        else:
            key = (stage, "F" if kind == "F" else "I")
            i = self.next.get(key, 0)
            self.next[key] = i + 1
            if kind == "I":
                self.waiting.setdefault(stage, deque()).append(i)
                self.split.append(stage)
        self.order.append(Action(stage, i, kind))

    def run_oldest_weight(self) -> None:
        """Append the W of the micro-batch whose I ran first among those waiting, on any stage."""
        self.run(self.split[0], "W")

    def count(self, stage: int, kind: str) -> int:
        """How many of `kind` (F, or I and B together) `stage` has run so far."""
        return self.next.get((stage, "F" if kind == "F" else "I"), 0)

    def pending(self, stage: int) -> int:
        """How many micro-batches of `stage` wait for their W."""
        return len(self.waiting.get(stage, ()))


def zb1p(rank: int, pp: int, m: int) -> list[Action]:
    """ZB-H1's order for `rank` of `pp`, over `m` micro-batches (any m >= 1).

    1F1B's, with each B split into I and W, and rank r's first r W's held back:
    - warm-up: min(m, pp-1-r) forwards, one fewer than 1F1B's, since the
      steady state below starts with a forward;
    - steady: per micro-batch k, the next forward if any remain, I(k), and
      from k = r on (or once the forwards are done) the oldest pending W;
    - cool-down: the r held-back W's.
    The held-back W's are what fills the drain: the gradient of the last
    micro-batch reaches rank r (pp-1-r) I's after the last rank's, and rank r
    then has r W's left, so every rank ends at the same time, pp-1 units of idle
    each at unit costs (1F1B: 3(pp-1)). Rank r holds at most pp micro-batches
    from F to W, 1F1B's rank 0 peak (min(m, pp) with fewer micro-batches).
    m < pp runs rather than being refused: the order stays complete and
    deadlock-free, only the fill shows, since the last rank then holds all of
    its W's to the end (pp-m more idle per rank: see theoretical_bubble).
    """
    b = _Rank()
    for _ in range(min(m, pp - 1 - rank)):
        b.run(rank, "F")
    for k in range(m):
        forward = b.count(rank, "F") < m
        if forward:
            b.run(rank, "F")
        b.run(rank, "I")
        if k >= rank or not forward:
            b.run(rank, "W")
    while b.pending(rank):
        b.run(rank, "W")
    return b.order


def zbv(rank: int, pp: int, m: int) -> list[Action]:
    """ZB-V's order for `rank` of `pp` (stages rank and 2pp-1-rank), over `m` micro-batches (any m >= 1).

    With `down` = stage rank (the V's first leg) and `up` = stage 2pp-1-rank:
    1. 2(pp-r)-1 forwards of `down`: the first leg fills the ranks below;
    2. r pairs: F `up`, F `down`, as the second leg's activations come back up;
    3. pp-r triples F, I, W of `up`: its gradient comes back at once, since
       the stages after it have nothing else queued;
    4. steady state, until both legs have run every forward: F `down` (while
       any remain), I and W of `down`, then F, I and W of `up`;
    5. cool-down: r pairs I `down`, I `up`, then pp-r pairs I `down` with the
       oldest W of `down`, then the W's still pending, `up`'s first.
    The phases count on n >= 2pp-1 micro-batches, so the order is built for
    max(m, 2pp-1) and the micro-batches from m on are dropped: removing actions
    delays nothing that remains, so the shorter order stays deadlock-free.
    """
    n = max(m, 2 * pp - 1)
    down, up = rank, 2 * pp - 1 - rank
    b = _Rank()
    for _ in range(2 * (pp - rank) - 1):
        b.run(down, "F")
    for _ in range(rank):
        b.run(up, "F")
        b.run(down, "F")
    for _ in range(pp - rank):
        for kind in "FIW":
            b.run(up, kind)
    while b.count(up, "F") < b.count(down, "F") or b.count(down, "F") < n:
        if b.count(down, "F") < n:
            b.run(down, "F")
        for stage, kind in ((down, "I"), (down, "W"), (up, "F"), (up, "I"), (up, "W")):
            b.run(stage, kind)
    for _ in range(rank):
        b.run(down, "I")
        b.run(up, "I")
    for _ in range(pp - rank):
        b.run(down, "I")
        b.run(down, "W")
    for stage in (up, down):
        while b.pending(stage):
            b.run(stage, "W")
    return [a for a in b.order if a.microbatch < m]


def dualpipev(rank: int, pp: int, m: int) -> list[Action]:
    """DualPipeV's order for `rank` of `pp` (stages rank and 2pp-1-rank), over `m` >= 2pp micro-batches.

    DeepSeek's DualPipe (DeepSeek-V3 report, 2024) cut in half: the V layout of
    zbv, but an order built to pair a forward of one stage with a backward of the
    other, so that on a GPU the two can overlap (one's communication hidden
    behind the other's compute). With `down` = stage rank and `up` = stage
    2pp-1-rank, rank r runs:
    1. 2(pp-1-r) forwards of `down`: the first leg fills the ranks below;
    2. r+1 pairs F `down`, F `up`: the second leg's first activations come back;
    3. pp-1-r triples I `up`, the oldest W, F `up`: the gradient turns at once, and a W
       fills each gap while the next activation climbs back;
    4. steady state, m-2pp+r+1 times: F `down` with B `up`, then F `up` with B `down`
       (the two halves of each are the pair a GPU would overlap);
    5. pp-1-r times: B `up`, then F `up` with B `down`: the last forwards;
    6. r+1 pairs: the backward of `up`, then of `down`; from the middle pair on they
       split, I now and W later (from `up` when r is odd, from `down` when even), so
       that r+1 W's wait;
    7. pp-1-r pairs: the oldest W, then I `down`: a W fills the wait for each gradient;
    8. the r+1 W's still waiting.
    W's run oldest first over both stages. Phase 4 needs m >= 2pp: with fewer the
    phases do not fit (`schedule._check_args` refuses them).

    plait's executor runs one action at a time, so here the pairs of phases 4 and 5 run
    back to back; the overlap would need both actions in flight at once: the forward's and
    the backward's kernels on two CUDA streams (or their modules' pieces interleaved by
    hand, as DeepSeek does for its MoE all-to-all), with both sets of messages posted
    before either computes.
    """
    down, up = rank, 2 * pp - 1 - rank
    b = _Rank()
    for _ in range(2 * (pp - 1 - rank)):
        b.run(down, "F")
    for _ in range(rank + 1):
        b.run(down, "F")
        b.run(up, "F")
    for _ in range(pp - 1 - rank):
        b.run(up, "I")
        b.run_oldest_weight()
        b.run(up, "F")
    for _ in range(m - 2 * pp + rank + 1):
        for stage, kind in ((down, "F"), (up, "B"), (up, "F"), (down, "B")):
            b.run(stage, kind)
    for _ in range(pp - 1 - rank):
        for stage, kind in ((up, "B"), (up, "F"), (down, "B")):
            b.run(stage, kind)
    middle = (rank + 1) // 2
    for i in range(rank + 1):
        split_up = i > middle or (i == middle and rank % 2 == 1)
        b.run(up, "I" if split_up else "B")
        b.run(down, "I" if i >= middle else "B")
    for _ in range(pp - 1 - rank):
        b.run_oldest_weight()
        b.run(down, "I")
    while b.split:
        b.run_oldest_weight()
    return b.order


def whole_first_stage(order: list[Action]) -> list[Action]:
    """`order` with each I of stage 0 that its W follows at once replaced by one B.

    Splitting a backward helps only the stage before, which waits for the I: stage 0 has
    none (its input is the token ids), and where its W runs right after its I the split
    moves nothing into a bubble. A B then does the same work in the same slot without
    the split's own cost: the deferred linears' Python path in F and I, and their
    (input, output gradient) pairs, freshly allocated in I and read cold in W. torch's
    pipelining likewise runs its first stage's whole backward in W. Both zero-bubble
    orders run stage 0's I and W back to back, so on stage 0 they are 1F1B-like.
    """
    out: list[Action] = []
    for a in order:
        if a.stage == 0 and a.kind == "W" and out and out[-1] == Action(0, a.microbatch, "I"):
            out[-1] = Action(0, a.microbatch, "B")
        else:
            out.append(a)
    return out
