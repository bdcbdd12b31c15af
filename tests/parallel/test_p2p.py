"""The p2p plan: exact batches, proven deadlock-free for every schedule, and the checker's messages."""

from __future__ import annotations

import pytest

from plait.parallel.p2p import check_matching, check_plan, check_shape_plan, messages, p2p_plan, shape_plan
from plait.parallel.schedule import SCHEDULES, Action, ScheduleError, make_schedule, schedule_layout, stage_rank
from tests.parallel.test_schedule import cases


def act(src, dst, i):
    return ("act", src, dst, i)


def grad(src, dst, i):
    return ("grad", src, dst, i)


def test_messages_of_each_action():
    assert messages(Action(0, 3, "F"), 2) == (None, [act(0, 1, 3)])
    assert messages(Action(1, 3, "F"), 2) == (act(0, 1, 3), [])
    assert messages(Action(1, 3, "B"), 2) == (None, [grad(1, 0, 3)])
    assert messages(Action(1, 3, "B"), 3) == (grad(2, 1, 3), [grad(1, 0, 3)])
    assert messages(Action(0, 0, "B"), 3) == (grad(1, 0, 0), [])


def test_1f1b_pp2_m2_plan():
    # Simulated with F=1, B=2: rank 0 runs 0F0 [0,1] 0F1 [1,2] 0B0 [4,6] 0B1 [8,10];
    # rank 1 runs 1F0 [1,2] 1B0 [2,4] 1F1 [4,5] 1B1 [5,7].
    plan = p2p_plan(make_schedule("1f1b", 2, 2), 2, 2)
    assert plan[0] == [
        [],                                                    # before 0F0
        [[("send", act(0, 1, 0))]],                            # before 0F1 (t=1)
        [[("send", act(0, 1, 1))], [("recv", grad(1, 0, 0))]],  # before 0B0 (t=2, t=4)
        [[("recv", grad(1, 0, 1))]],                           # before 0B1 (t=7)
        [],                                                    # after the last
    ]
    assert plan[1] == [
        [[("recv", act(0, 1, 0))]],   # before 1F0 (t=1)
        [[("recv", act(0, 1, 1))]],   # before 1B0 (t=2): posted while 1B0 computes
        [[("send", grad(1, 0, 0))]],  # before 1F1 (t=4)
        [],
        [[("send", grad(1, 0, 1))]],  # after 1B1 (t=7)
    ]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_proven_deadlock_free_with_in_order_p2p(name):
    count = 0
    layout = schedule_layout(name)
    for pp, m, v in cases(name):
        schedule = make_schedule(name, pp, m, v)
        plan = p2p_plan(schedule, pp, m, v, layout=layout)
        check_plan(schedule, plan, pp, v, layout)
        for rank, slots in plan.items():
            assert len(slots) == len(schedule[rank]) + 1
        count += 1
    assert count > 0


def test_ahead_posting_deadlocks_where_p2p_runs_in_order():
    """Posting each receive one action early, alone (what gloo tolerates), deadlocks GPipe
    once a backend runs one peer's operations in order: both ranks' first batches wait."""
    schedule = make_schedule("gpipe", 2, 2)
    plan = {
        0: [[], [[("send", act(0, 1, 0))]], [[("recv", grad(1, 0, 0))], [("send", act(0, 1, 1))]],
            [[("recv", grad(1, 0, 1))]], []],
        1: [[[("recv", act(0, 1, 0))]], [[("recv", act(0, 1, 1))]], [], [[("send", grad(1, 0, 0))]],
            [[("send", grad(1, 0, 1))]]],
    }
    # Rank 0 waits for gradient 0 before it sends activation 1; rank 1 waits for
    # activation 1 before it sends gradient 0.
    with pytest.raises(ScheduleError) as e:
        check_plan(schedule, plan, 2)
    assert str(e.value) == ("deadlock: rank 0 waits to recv the gradient of micro-batch 0 from stage 1 to stage 0")


def test_a_receive_after_its_action_is_refused():
    schedule = make_schedule("gpipe", 2, 1)
    plan = {0: [[], [[("send", act(0, 1, 0))], [("recv", grad(1, 0, 0))]], []],
            1: [[], [[("recv", act(0, 1, 0))]], [[("send", grad(1, 0, 0))]]]}
    with pytest.raises(ScheduleError) as e:
        check_plan(schedule, plan, 2)
    assert str(e.value) == "rank 1 runs 1F0 before it posts the receive of its input"


def test_gloo_plan_posts_each_receive_one_action_earlier():
    plan = p2p_plan(make_schedule("gpipe", 2, 3), 2, 3, lead=1)
    # Rank 1 runs 1F0 1F1 1F2 1B0 1B1 1B2: activation i+1 is received while 1F(i) computes.
    assert plan[1][:3] == [[[("recv", act(0, 1, 0))], [("recv", act(0, 1, 1))]], [[("recv", act(0, 1, 2))]], []]
    assert plan[0][2:5] == [[[("send", act(0, 1, 1))], [("recv", grad(1, 0, 0))]],
                            [[("send", act(0, 1, 2))], [("recv", grad(1, 0, 1))]],
                            [[("recv", grad(1, 0, 2))]]]


@pytest.mark.parametrize("name", SCHEDULES)
def test_gloo_plan_sends_as_the_in_order_one_and_receives_no_later(name):
    layout = schedule_layout(name)
    for pp, m, v in cases(name):
        schedule = make_schedule(name, pp, m, v)
        lockstep, early = p2p_plan(schedule, pp, m, v, layout=layout), p2p_plan(schedule, pp, m, v, 1, layout)
        for rank in schedule:
            def slot_of(plan, direction):
                return {op: n for n, slot in enumerate(plan[rank]) for b in slot for op in b if op[0] == direction}
            assert slot_of(early, "send") == slot_of(lockstep, "send")
            late, soon = slot_of(lockstep, "recv"), slot_of(early, "recv")
            assert late.keys() == soon.keys() and all(soon[op] == max(0, late[op] - 1) for op in late)


# --- what NCCL matches on: order per pair of ranks, one message per direction per peer in a batch ---

@pytest.mark.parametrize("name", SCHEDULES)
def test_every_plan_orders_each_pair_alike_on_both_ends(name):
    """Over the whole grid, for the in-order plan (NCCL) and gloo's early one: the messages a rank
    sends to another are posted in the order the other posts their receives, and no batch holds
    two messages in one direction for one peer."""
    layout = schedule_layout(name)
    for pp, m, v in cases(name):
        schedule = make_schedule(name, pp, m, v)
        for lead in (0, 1):
            plan = p2p_plan(schedule, pp, m, v, lead=lead, layout=layout)
            batches = {rank: [batch for slot in slots for batch in slot] for rank, slots in plan.items()}
            check_matching(batches, pp, layout)
            for rank, seq in batches.items():
                for batch in seq:
                    ends = [(d, msg[2] if d == "send" else msg[1]) for d, msg in batch]
                    peers = set((d, stage_rank(s, pp, layout)) for d, s in ends)
                    assert len(ends) == len(peers), (name, pp, m, v, lead, batch)


def test_shape_probe_plan_for_an_interleaved_pipeline():
    # pp=2, 2 chunks: stages 0 1 2 3 on ranks 0 1 0 1; each crossing is one header in its own batch.
    def shape(src, dst):
        return ("shape", src, dst, 0)

    assert shape_plan(2, 2) == {
        0: [("run", 0), [("send", shape(0, 1))], [("recv", shape(1, 2))], ("run", 2), [("send", shape(2, 3))]],
        1: [[("recv", shape(0, 1))], ("run", 1), [("send", shape(1, 2))], [("recv", shape(2, 3))], ("run", 3)],
    }
    assert shape_plan(1, 1) == {0: [("run", 0)]}


def test_every_shape_probe_matches_on_both_ends_and_cannot_deadlock():
    for pp in range(1, 9):
        for v in range(1, 5):
            steps = shape_plan(pp, v)
            check_shape_plan(steps, pp)
            runs = sorted(step[1] for seq in steps.values() for step in seq if isinstance(step, tuple))
            assert runs == list(range(pp * v))
            for seq in steps.values():
                assert all(len(item) == 1 for item in seq if isinstance(item, list))  # a batch of its own


def test_two_messages_one_way_in_a_batch_are_refused():
    batches = {0: [[("send", act(0, 1, 0)), ("send", act(0, 1, 1))]], 1: [[("recv", act(0, 1, 0))], [("recv", act(0, 1, 1))]]}
    with pytest.raises(ScheduleError) as e:
        check_matching(batches, 2)
    assert str(e.value) == "rank 0's batch 0 holds two sends to rank 1; NCCL would match them by position only"


def test_messages_posted_in_another_order_on_the_receiver_are_refused():
    # gloo would match these by tag; NCCL pairs the first send with the first receive.
    batches = {0: [[("send", act(0, 1, 0))], [("send", act(0, 1, 1))]],
               1: [[("recv", act(0, 1, 1))], [("recv", act(0, 1, 0))]]}
    with pytest.raises(ScheduleError) as e:
        check_matching(batches, 2)
    assert str(e.value) == ("rank 0 sends to rank 1 in another order than rank 1 receives: message 0 is "
                            "('act', 0, 1, 0) on the sender and ('act', 0, 1, 1) on the receiver")


def test_a_header_grouped_with_its_data_on_one_end_only_is_refused():
    """The old executor, as data: the sender put the shape header and the data in one batch while
    the receiver posted the header alone and the data later (undefined on NCCL)."""
    header = ("shape", 0, 1, 0)
    batches = {0: [[("send", header), ("send", act(0, 1, 0))]],
               1: [[("recv", header)], [("recv", act(0, 1, 0))]]}
    with pytest.raises(ScheduleError) as e:
        check_matching(batches, 2)
    assert str(e.value) == "rank 0's batch 0 holds two sends to rank 1; NCCL would match them by position only"
