"""Pipeline schedules: exact orders, torch parity, simulator numbers, validation messages."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from plait.parallel.schedule import (
    SCHEDULES,
    Action,
    ScheduleError,
    format_grid,
    make_schedule,
    num_stages,
    rank_stages,
    schedule_layout,
    simulate,
    stage_rank,
    theoretical_bubble,
    validate,
)


def parse(text: str) -> list[Action]:
    """'0F0 0B1' -> [Action(0, 0, 'F'), Action(0, 1, 'B')] (single-digit stages)."""
    return [Action(int(t[0]), int(t[2:]), t[1]) for t in text.split()]


def show(schedule) -> dict[int, str]:
    return {r: " ".join(map(str, acts)) for r, acts in schedule.items()}


def cases(name):
    """Every (pp, m, virtual) the grid tests cover for schedule `name`."""
    for pp in range(1, 9):
        for m in range(1, 17):
            if name == "zbv" or (name == "dualpipev" and m >= 2 * pp):
                yield pp, m, 2
            elif name == "dualpipev":
                continue
            elif name != "interleaved-1f1b":
                yield pp, m, 1
            elif m % pp == 0:
                for v in (2, 3, 4):
                    yield pp, m, v


# --- layout -----------------------------------------------------------------

def test_stage_layout_is_megatron_interleaved():
    assert num_stages(4, 3) == 12
    assert [stage_rank(s, 4) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert rank_stages(1, 4, 3) == [1, 5, 9]
    assert rank_stages(0, 2) == [0]


def test_action_str_and_order():
    assert str(Action(1, 0, "F")) == "1F0"
    assert str(Action(12, 7, "B")) == "12B7"
    assert sorted([Action(1, 0, "F"), Action(0, 2, "B"), Action(0, 1, "F")]) == [
        Action(0, 1, "F"), Action(0, 2, "B"), Action(1, 0, "F")]


# --- every schedule over a grid of shapes ------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
def test_grid_valid_complete_and_bubble(name):
    count = 0
    layout = schedule_layout(name)
    kinds = {"forward-only": "F", "zb1p": "FIW", "zbv": "FIW"}.get(name, "FB")
    for pp, m, v in cases(name):
        sched = make_schedule(name, pp, m, v)
        forward_only = name == "forward-only"
        validate(sched, pp, m, v, forward_only=forward_only, layout=layout)
        # B = 2 splits into I = W = 1: the zero-bubble formulas' equal costs.
        sim = simulate(sched, pp, m, v, forward_cost=1.0, backward_cost=2.0, comm_cost=0.0, layout=layout)
        seen = Counter((a.stage, a.microbatch, a.kind) for acts in sched.values() for a in acts)
        # Stage 0 of a zero-bubble order runs whole B's (zero_bubble.whole_first_stage).
        expected = {(s, i, k): 1 for s in range(pp * v) for i in range(m) for k in ("FB" if s == 0 and kinds == "FIW" else kinds)}
        if name == "dualpipev":  # a micro-batch's backward on a stage is a B or an I and a W, by its phase
            expected = {(s, i, k): 1 for s in range(pp * v) for i in range(m)
                        for k in ("FB" if (s, i, "B") in seen else "FIW")}
        assert seen == expected, (pp, m, v)
        assert [len(t) for t in sim.timeline.values()] == [len(sched[r]) for r in range(pp)]
        # With equal stage costs and free comms the simulated idle fraction
        # is exactly the textbook one, interleaved included (checked by hand
        # for pp=2 m=2 v=2 below: makespan 15, bubble 1/5).
        assert sim.bubble == pytest.approx(theoretical_bubble(name, pp, m, v), abs=1e-9), (pp, m, v)
        if name in ("interleaved-1f1b", "zb1p", "zbv", "dualpipev"):
            assert sim.bubble <= theoretical_bubble("1f1b", pp, m) + 1e-12
        count += 1
    assert count == {"interleaved-1f1b": 3 * sum(16 // pp for pp in range(1, 9)),
                     "dualpipev": sum(17 - 2 * pp for pp in range(1, 9))}.get(name, 128)


def test_theoretical_bubble_values():
    assert theoretical_bubble("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("forward-only", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("interleaved-1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert theoretical_bubble("1f1b", 1, 5) == 0.0


# --- exact orders, written out by hand --------------------------------------

def test_gpipe_order_pp2_m3():
    assert show(make_schedule("gpipe", 2, 3)) == {
        0: "0F0 0F1 0F2 0B0 0B1 0B2",
        1: "1F0 1F1 1F2 1B0 1B1 1B2",
    }


def test_forward_only_order_pp2_m3():
    assert show(make_schedule("forward-only", 2, 3)) == {0: "0F0 0F1 0F2", 1: "1F0 1F1 1F2"}


def test_1f1b_order_pp2_m4():
    assert show(make_schedule("1f1b", 2, 4)) == {
        0: "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3",
        1: "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3",
    }


def test_1f1b_order_pp3_m5_and_pp4_m6():
    # Read off torch's Schedule1F1B._step_microbatches: min(m, pp - rank)
    # forwards, then B/F pairs while forwards remain, then the last Bs.
    assert show(make_schedule("1f1b", 3, 5)) == {
        0: "0F0 0F1 0F2 0B0 0F3 0B1 0F4 0B2 0B3 0B4",
        1: "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1F4 1B3 1B4",
        2: "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2F4 2B4",
    }
    assert show(make_schedule("1f1b", 4, 6)) == {
        0: "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
        1: "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1B4 1B5",
        2: "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5",
        3: "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5",
    }


def test_1f1b_fewer_microbatches_than_ranks():
    assert show(make_schedule("1f1b", 4, 2))[0] == "0F0 0F1 0B0 0B1"
    assert show(make_schedule("1f1b", 4, 2))[3] == "3F0 3B0 3F1 3B1"


def test_interleaved_order_pp2_v2_m4():
    # Rank 0 holds stages 0, 2; rank 1 holds 1, 3. Warm-up: rank 0 (2-0-1)*2
    # + (2-1)*2 = 4 forwards, rank 1 0 + 2 = 2. Forwards go in groups of pp
    # micro-batches per chunk; backwards start from the last chunk.
    assert show(make_schedule("interleaved-1f1b", 2, 4, 2)) == {
        0: "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        1: "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    }


def test_interleaved_warmup_is_capped_at_all_work():
    # pp=2 m=2 v=2: rank 0's warm-up would be 4 = m*v, so it runs fill-drain.
    assert show(make_schedule("interleaved-1f1b", 2, 2, 2))[0] == "0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1"


# --- parity with torch.distributed.pipelining --------------------------------

def torch_orders(schedule_cls, pp: int, m: int) -> dict[int, str]:
    """Compute actions torch's single-stage schedule runs on each rank.

    Drives the real `_step_microbatches` with a stage stub that records
    forward/backward calls and has no communication ops, so no processes
    are needed. (torch's `pipeline_order` IR is not used: in torch 2.13 it
    starts the last rank at F1, unlike what `_step_microbatches` runs.)
    """
    out = {}
    for rank in range(pp):
        ran: list[str] = []
        stage = SimpleNamespace(num_stages=pp, stage_index=rank, is_first=rank == 0,
                                is_last=rank == pp - 1)
        stage.get_fwd_recv_ops = stage.get_fwd_send_ops = lambda i: []
        stage.get_bwd_recv_ops = stage.get_bwd_send_ops = lambda i: []
        stage.forward_one_chunk = lambda i, *a, **k: ran.append(f"{rank}F{i}")
        stage.backward_one_chunk = lambda i, **k: ran.append(f"{rank}B{i}")
        stage.perform_reduce_grad = lambda *a: None
        sched = schedule_cls(stage, m)
        sched._initialize_stage = lambda *a, **k: None
        sched._step_microbatches([()] * m, [{}] * m)
        out[rank] = " ".join(ran)
    return out


def test_1f1b_and_gpipe_match_torch():
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for pp in (2, 3, 4):
        for m in (pp, pp + 1, 2 * pp + 1, 8):  # torch's 1F1B requires m >= pp
            assert show(make_schedule("1f1b", pp, m)) == torch_orders(schedules.Schedule1F1B, pp, m)
            assert show(make_schedule("gpipe", pp, m)) == torch_orders(schedules.ScheduleGPipe, pp, m)
    # The stub really records: a known case, spelled out.
    assert torch_orders(schedules.Schedule1F1B, 2, 4)[0] == "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3"


# --- simulator numbers --------------------------------------------------------

def test_simulate_1f1b_timeline_pp2_m2():
    sim = simulate(make_schedule("1f1b", 2, 2), 2, 2)
    assert {r: [(s, e, str(a)) for s, e, a in t] for r, t in sim.timeline.items()} == {
        0: [(0, 1, "0F0"), (1, 2, "0F1"), (4, 6, "0B0"), (7, 9, "0B1")],
        1: [(1, 2, "1F0"), (2, 4, "1B0"), (4, 5, "1F1"), (5, 7, "1B1")],
    }
    assert sim.makespan == 9
    assert sim.bubble == pytest.approx(1 / 3)
    assert sim.peak_in_flight == {0: 2, 1: 1}


def test_simulate_interleaved_by_hand_pp2_m2_v2():
    # Worked by hand: rank 0 ends 0B1 at 15; busy 12 per rank -> 1 - 24/30.
    sim = simulate(make_schedule("interleaved-1f1b", 2, 2, 2), 2, 2, 2)
    assert sim.makespan == 15
    assert sim.bubble == pytest.approx(0.2)
    assert [(s, e) for s, e, _ in sim.timeline[1]] == [
        (1, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 9), (9, 11), (11, 13)]


def test_simulate_comm_cost_and_per_stage_costs():
    sim = simulate(make_schedule("1f1b", 2, 1), 2, 1, comm_cost=0.5)
    assert [(s, e) for s, e, _ in sim.timeline[0]] == [(0, 1), (5, 7)]
    assert [(s, e) for s, e, _ in sim.timeline[1]] == [(1.5, 2.5), (2.5, 4.5)]
    assert sim.makespan == 7
    sim = simulate(make_schedule("gpipe", 2, 2), 2, 2, forward_cost=[1, 3], backward_cost=[2, 6])
    assert [(s, e) for s, e, _ in sim.timeline[1]] == [(1, 4), (4, 7), (7, 13), (13, 19)]
    assert sim.makespan == 21
    assert sim.bubble == pytest.approx(3 / 7)
    with pytest.raises(ScheduleError, match=r"^forward_cost has 3 entries; expected one per stage \(2\)$"):
        simulate(make_schedule("gpipe", 2, 2), 2, 2, forward_cost=[1, 1, 1])



def test_simulate_replays_each_actions_own_time():
    # A measured step replayed: every action its own time, the order and dependencies the schedule's.
    sched = make_schedule("1f1b", 2, 2)
    times = {"0F0": 1, "0F1": 2, "0B0": 5, "0B1": 1, "1F0": 3, "1B0": 4, "1F1": 1, "1B1": 2}
    sim = simulate(sched, 2, 2, action_cost={a: times[str(a)] for acts in sched.values() for a in acts})
    assert [(str(a), s, e) for s, e, a in sim.timeline[0]] == [("0F0", 0, 1), ("0F1", 1, 3), ("0B0", 8, 13),
                                                              ("0B1", 13, 14)]
    assert [(str(a), s, e) for s, e, a in sim.timeline[1]] == [("1F0", 1, 4), ("1B0", 4, 8), ("1F1", 8, 9),
                                                              ("1B1", 9, 11)]
    assert sim.makespan == 14
    assert sim.bubble == pytest.approx(1 - 19 / 28)
    with pytest.raises(ScheduleError, match=r"^action_cost has no time for 1B0, 1B1$"):
        simulate(sched, 2, 2, action_cost={a: 1.0 for a in sched[0] + sched[1] if str(a)[1:2] != "B" or a.stage == 0})

def test_peak_in_flight():
    for pp in range(1, 9):
        for m in range(1, 17):
            assert simulate(make_schedule("1f1b", pp, m), pp, m).peak_in_flight == {
                r: min(pp - r, m) for r in range(pp)}
            assert simulate(make_schedule("gpipe", pp, m), pp, m).peak_in_flight[0] == m
    assert simulate(make_schedule("interleaved-1f1b", 2, 4, 2), 2, 4, 2).peak_in_flight == {0: 5, 1: 3}


# --- validation messages --------------------------------------------------------

def error(schedule, pp, m, **kw) -> str:
    with pytest.raises(ScheduleError) as info:
        validate({r: parse(t) for r, t in schedule.items()}, pp, m, **kw)
    return str(info.value)


def test_validate_missing_backward():
    assert error({0: "0F0 0F1 0B0 0B1", 1: "1F0 1B0 1F1"}, 2, 2) == (
        "missing 1B1 on rank 1\n"
        "rank 0 | 0F0 0F1 0B0 0B1\n"
        "rank 1 | 1F0 1B0 [1F1]")


def test_validate_duplicate_forward():
    assert error({0: "0F0 0F1 0F1 0B0 0B1", 1: "1F0 1F1 1B0 1B1"}, 2, 2) == (
        "rank 0 step 2: duplicate 0F1\n"
        "rank 0 | 0F0 0F1 [0F1] 0B0 0B1\n"
        "rank 1 | 1F0 1F1 1B0 1B1")


def test_validate_backward_before_forward():
    assert error({0: "0F0 0B1 0F1 0B0", 1: "1F0 1F1 1B0 1B1"}, 2, 2) == (
        "rank 0 step 1: 0B1 runs before its forward 0F1\n"
        "rank 0 | 0F0 [0B1] 0F1 0B0\n"
        "rank 1 | 1F0 1F1 1B0 1B1")


def test_validate_wrong_rank():
    assert error({0: "0F0 0B0 1F0", 1: "1B0"}, 2, 1) == (
        "rank 0 step 2: 1F0 belongs to rank 1\n"
        "rank 0 | 0F0 0B0 [1F0]\n"
        "rank 1 | 1B0")


def test_validate_other_first_lines():
    assert error({0: "0F0 0B0"}, 2, 1).splitlines()[0] == "rank 1 missing from schedule (expected ranks 0..1)"
    assert error({0: "0F0 0F5"}, 1, 2).splitlines()[0] == "rank 0 step 1: microbatch 5 out of range 0..1"
    assert error({0: "0F0 2F0"}, 1, 1, virtual=2).splitlines()[0] == "rank 0 step 1: stage 2 out of range 0..1"
    assert error({0: "0F0 0B0"}, 1, 1, forward_only=True).splitlines()[0] == (
        "rank 0 step 1: 0B0 is a backward in a forward-only schedule")
    assert error({0: "0F0"}, 1, 2, forward_only=True) == "missing 0F1 on rank 0\nrank 0 | 0F0"


def test_deadlock_is_named():
    # Each rank waits on an action the other has queued behind its own wait.
    sched = {0: parse("0F0 0B0 0F1 0B1"), 1: parse("1F1 1B1 1F0 1B0")}
    validate(sched, 2, 2)  # well-formed: only running it reveals the cycle
    with pytest.raises(ScheduleError) as info:
        simulate(sched, 2, 2)
    assert str(info.value) == (
        "deadlock: rank 0 waits at 0B0 for 1B0, rank 1 waits at 1F1 for 0F1\n"
        "rank 0 | 0F0 [0B0] 0F1 0B1\n"
        "rank 1 | 1F1 1B1 1F0 1B0")


def test_format_grid_aligns_and_marks():
    sched = {0: [Action(0, 9, "F"), Action(0, 10, "F")], 1: [Action(1, 9, "F")]}
    assert format_grid(sched) == "rank 0 | 0F9  0F10\nrank 1 | 1F9"
    assert format_grid(sched, mark=(0, 0)) == "rank 0 | [0F9] 0F10\nrank 1 | 1F9"


# --- bad arguments ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("pipedream", 2, 4), "unknown schedule 'pipedream'; choose one of gpipe, 1f1b, interleaved-1f1b, zb1p, zbv, dualpipev, forward-only"),
    (("1f1b", 0, 4), "pp must be >= 1 (got 0)"),
    (("gpipe", 2, 0), "num_microbatches must be >= 1 (got 0)"),
    (("1f1b", 2, 4, 2), "1f1b runs one stage per rank, so virtual must be 1 (got 2); use interleaved-1f1b for virtual > 1"),
    (("forward-only", 2, 4, 0), "forward-only needs virtual >= 1 (got 0)"),
    (("interleaved-1f1b", 2, 4, 1), "interleaved-1f1b needs virtual >= 2 (got 1); use 1f1b for one stage per rank"),
    (("interleaved-1f1b", 4, 6, 2), "interleaved-1f1b needs micro-batches (6) to be a multiple of pp (4); use 4 or 8"),
    (("interleaved-1f1b", 4, 2, 2), "interleaved-1f1b needs micro-batches (2) to be a multiple of pp (4); use 4"),
])
def test_bad_arguments(args, message):
    for fn in (make_schedule, theoretical_bubble):
        with pytest.raises(ScheduleError) as info:
            fn(*args)
        assert str(info.value) == message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("pp,m,virtual", [(2, 3, 2), (4, 5, 2), (3, 4, 3)])
def test_forward_only_covers_interleaved_layouts(pp, m, virtual):
    sched = make_schedule("forward-only", pp, m, virtual)
    assert [str(a) for a in sched[0]][: m + 1] == [f"0F{i}" for i in range(m)] + [f"{pp}F0"]
    sim = simulate(sched, pp, m, virtual)  # validates and proves it deadlock-free
    assert sum(len(t) for t in sim.timeline.values()) == pp * virtual * m
