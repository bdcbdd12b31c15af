"""The zero-bubble schedules (zb1p, zbv, dualpipev), the I and W actions and the V layout: exact orders worked out by
hand, the simulated bubbles against the published formulas, validation messages, p2p plans, peak memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from plait import memory
from plait.parallel.p2p import check_matching, check_plan, check_shape_plan, messages, p2p_plan, shape_plan
from plait.parallel.schedule import (
    Action,
    ScheduleError,
    make_schedule,
    rank_stages,
    schedule_layout,
    simulate,
    stage_rank,
    theoretical_bubble,
    validate,
)
from plait.parallel import zero_bubble
from plait.parallel.zero_bubble import whole_first_stage, zb1p, zbv
from tests.parallel.test_schedule import error, parse, show


def paper(name: str, pp: int, m: int) -> dict[int, str]:
    """The published order, stage 0's I and W still apart (make_schedule joins them: below)."""
    return show({r: getattr(zero_bubble, name)(r, pp, m) for r in range(pp)})


# --- the V layout ----------------------------------------------------------------

def test_v_layout_places_stages_down_then_back_up():
    assert [stage_rank(s, 4, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [stage_rank(s, 4) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # "loop" stays the default
    assert rank_stages(1, 4, 2, "v") == [1, 6]
    assert rank_stages(0, 2, 3, "v") == [0, 3, 4]  # a third chunk would go down again
    assert rank_stages(1, 4, 2) == [1, 5]
    assert [schedule_layout(n) for n in ("gpipe", "1f1b", "interleaved-1f1b", "zb1p", "zbv", "dualpipev",
                                         "forward-only")] == ["loop", "loop", "loop", "loop", "v", "v", "loop"]
    with pytest.raises(ScheduleError, match=r"^unknown layout 'w'; choose one of loop, v$"):
        stage_rank(0, 2, "w")


def test_forward_only_runs_on_the_v_layout_for_evaluating_a_zbv_model():
    assert show(make_schedule("forward-only", 2, 2, 2, layout="v")) == {0: "0F0 0F1 3F0 3F1", 1: "1F0 1F1 2F0 2F1"}
    with pytest.raises(ScheduleError) as info:
        make_schedule("zbv", 2, 2, 2, layout="loop")
    assert str(info.value) == "zbv runs on the 'v' layout, not 'loop'; leave layout out"


# --- exact orders, worked out by hand ----------------------------------------------

def test_zb1p_order_pp2():
    # ZB-H1 (the paper's handcrafted schedule): rank r runs 1F1B's warm-up less one forward, then per
    # micro-batch a forward (while any remain), its I, and the oldest W, except that rank r holds its
    # first r W's back to the end. pp=2: rank 0 is 1F1B with each B as I then W; rank 1 holds one W.
    assert paper("zb1p", 2, 2) == {
        0: "0F0 0F1 0I0 0W0 0I1 0W1",
        1: "1F0 1I0 1F1 1I1 1W0 1W1",
    }
    assert paper("zb1p", 2, 4) == {
        0: "0F0 0F1 0I0 0W0 0F2 0I1 0W1 0F3 0I2 0W2 0I3 0W3",
        1: "1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3",
    }


def test_zb1p_order_pp4_m4():
    # Rank r: min(m, 3-r) forwards; then for k = 0..3: F (while any remain), I(k), and a W once k >= r
    # (or once the forwards are done); then the W's still held. The last rank holds all of its W's
    # until 3I3, so its F/I pairs run back to back and the gradient of micro-batch 3 leaves it early:
    # the held W's fill the drain that 1F1B leaves idle on every rank.
    assert paper("zb1p", 4, 4) == {
        0: "0F0 0F1 0F2 0F3 0I0 0W0 0I1 0W1 0I2 0W2 0I3 0W3",
        1: "1F0 1F1 1F2 1I0 1F3 1I1 1W0 1I2 1W1 1I3 1W2 1W3",
        2: "2F0 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2I3 2W1 2W2 2W3",
        3: "3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3W1 3W2 3W3",
    }


def test_zbv_order_pp2_m4():
    # ZB-V (rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; torch's order too, below). Rank r:
    # 2(pp-r)-1 forwards of its first stage; r pairs F up, F down; pp-r triples F, I, W of its second
    # stage (the gradient comes straight back: for rank 1 the loss is one stage away); then F down (while any
    # remain), I and W down, F, I and W up, until both stages have run every forward; then r pairs
    # I down, I up; pp-r pairs I down, W down; then the W's still pending, the second stage's first.
    assert paper("zbv", 2, 4) == {
        0: "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3",
        1: "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3",
    }


def test_zbv_matches_torch_s_zbv_order():
    """torch's ScheduleZBVZeroBubble builds each rank's order in `_calculate_single_rank_operations`
    from three numbers only (ranks, micro-batches, stages), so it runs here without processes; its
    idle slots (None) are left out, as plait's simulator waits by itself."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    kinds = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}
    for pp in range(1, 9):
        for m in range(1, 25):
            ours = paper("zbv", pp, m)
            for rank in range(pp):
                this = SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp)
                ops = schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations(this, rank)
                theirs = " ".join(f"{a.stage_index}{kinds[a.computation_type.name]}{a.microbatch_index}"
                                  for a in ops if a is not None)
                assert ours[rank] == theirs, (pp, m, rank)


def test_dualpipev_order_pp2_m4():
    # DualPipeV on zbv's V (rank 0: stages 0 and 3, rank 1: stages 1 and 2). Rank r: 2(pp-1-r) forwards
    # down; r+1 pairs F down, F up; pp-1-r triples I up, oldest W, F up; m-2pp+r+1 quads F down, B up,
    # F up, B down (two forward-and-backward pairs); pp-1-r triples B up, F up, B down; r+1 pairs of
    # backwards up then down, split into I from the middle pair on (from the up one when r is odd,
    # from the down one when even); pp-1-r pairs oldest W, I down; the W's left, oldest first.
    assert paper("dualpipev", 2, 4) == {
        0: "0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3",
        1: "1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3",
    }
    # pp=3: rank 0 (stages 0, 5) has one cool-down pair, split from its down backward (r even); rank 1
    # (1, 4) two, split from the up backward of the second (r odd); rank 2 (2, 3) three, split from
    # the down backward of the second. Each rank ends with r+1 W's.
    assert paper("dualpipev", 3, 6) == {
        0: "0F0 0F1 0F2 0F3 0F4 5F0 5I0 5W0 5F1 5I1 5W1 5F2 0F5 5B2 5F3 0B0 5B3 5F4 0B1 5B4 5F5 0B2 5B5 "
           "0I3 0W3 0I4 0W4 0I5 0W5",
        1: "1F0 1F1 1F2 4F0 1F3 4F1 4I0 4W0 4F2 1F4 4B1 4F3 1B0 1F5 4B2 4F4 1B1 4B3 4F5 1B2 4B4 1B3 "
           "4I5 1I4 4W5 1I5 1W4 1W5",
        2: "2F0 3F0 2F1 3F1 2F2 3F2 2F3 3B0 3F3 2B0 2F4 3B1 3F4 2B1 2F5 3B2 3F5 2B2 3B3 2B3 3B4 2I4 "
           "3I5 2I5 2W4 3W5 2W5",
    }
    # Stage 0's I and W end back to back: make_schedule runs them whole (whole_first_stage).
    assert show(make_schedule("dualpipev", 3, 6, 2))[0].endswith("0B2 5B5 0B3 0B4 0B5")


def test_dualpipev_matches_torch_s_dualpipev_order():
    """torch's ScheduleDualPipeV builds each rank's order from the ranks and micro-batches alone; its
    overlapped forward-and-backward pairs are listed as their two actions, forward first, as plait
    runs them."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    kinds = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "FULL_BACKWARD": "B"}

    def name(a):
        if a.computation_type.name == "OVERLAP_F_B":
            return " ".join(name(s) for s in a.sub_actions)
        return f"{a.stage_index}{kinds[a.computation_type.name]}{a.microbatch_index}"

    for pp in range(1, 9):
        for m in range(2 * pp, 2 * pp + 12):
            ours = paper("dualpipev", pp, m)
            for rank in range(pp):
                this = SimpleNamespace(pp_group_size=pp, _n_microbatches=m)
                ops = schedules.ScheduleDualPipeV._calculate_single_rank_operations(this, rank)
                assert ours[rank] == " ".join(name(a) for a in ops if a is not None), (pp, m, rank)


def test_zbv_with_fewer_micro_batches_than_its_phases_is_the_longer_order_cut():
    # The phases need 2pp-1 = 3 micro-batches; m=2 is the m=3 order without micro-batch 2.
    three = {r: zbv(r, 2, 3) for r in range(2)}
    assert paper("zbv", 2, 2) == {r: " ".join(str(a) for a in acts if a.microbatch < 2)
                                  for r, acts in three.items()}
    assert paper("zbv", 2, 2) == {
        0: "0F0 0F1 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 0I1 0W1",
        1: "1F0 2F0 1F1 2F1 2I0 2W0 1I0 1W0 2I1 2W1 1I1 1W1",
    }


def test_stage_0_runs_whole_backwards_where_its_i_and_w_are_back_to_back():
    # Nobody waits for stage 0's input gradient, and both orders run its I and W back to back:
    # make_schedule runs them as one B. Every other stage keeps the published split.
    assert show(make_schedule("zb1p", 2, 4)) == {
        0: "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3",
        1: "1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3",
    }
    assert show(make_schedule("zbv", 2, 4, 2)) == {
        0: "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0B0 3F2 3I2 3W2 0B1 3F3 3I3 3W3 0B2 0B3",
        1: "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3",
    }
    for name, v in (("zb1p", 1), ("zbv", 2)):
        for pp in range(1, 7):
            for m in range(1, 14):
                whole = show(make_schedule(name, pp, m, v))
                published = paper(name, pp, m)
                for r in range(pp):
                    out = []
                    for a in published[r].split():  # 0I k then 0W k becomes 0B k; nothing else changes
                        if a.startswith("0W") and out and out[-1] == "0I" + a[2:]:
                            out[-1] = "0B" + a[2:]
                        else:
                            out.append(a)
                    assert whole[r] == " ".join(out), (name, pp, m, r)
                    assert not any(a.startswith(("0I", "0W")) for a in whole[r].split()), (name, pp, m, r)
    # The same work in the same slots at equal costs (B = I + W): the same makespan and bubble.
    for pp, m in ((2, 4), (4, 8), (3, 2)):
        joined = simulate(make_schedule("zb1p", pp, m), pp, m)
        split = simulate({r: zb1p(r, pp, m) for r in range(pp)}, pp, m)
        assert (joined.makespan, joined.bubble) == (split.makespan, split.bubble)
    assert whole_first_stage(parse("0F0 0I0 1F0 0W0")) == parse("0F0 0I0 1F0 0W0")  # not back to back: kept


# --- simulated bubbles ----------------------------------------------------------------

def test_zb1p_timeline_pp2_m2_by_hand():
    # F = I = W = 1. Rank 1 runs 1I0 as soon as 1F0 is done, then 1F1 (0F1 ended at 2) and 1I1; its
    # held 1W0 runs while rank 0 does 0I1. Both ranks end at 7 = 3m + pp - 1: one unit idle each,
    # against 1F1B's 9 and three.
    # Rank 0 runs each I and W of stage 0 as one B of cost 2 (whole_first_stage): the same slots.
    sim = simulate(make_schedule("zb1p", 2, 2), 2, 2)
    assert {r: [(s, e, str(a)) for s, e, a in t] for r, t in sim.timeline.items()} == {
        0: [(0, 1, "0F0"), (1, 2, "0F1"), (3, 5, "0B0"), (5, 7, "0B1")],
        1: [(1, 2, "1F0"), (2, 3, "1I0"), (3, 4, "1F1"), (4, 5, "1I1"), (5, 6, "1W0"), (6, 7, "1W1")],
    }
    assert (sim.makespan, sim.idle, sim.bubble) == (7, 2, 1 - 12 / 14)
    assert sim.peak_in_flight == {0: 2, 1: 2}


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 5), (3, 3), (3, 8), (4, 4), (4, 8), (4, 13), (6, 6), (8, 8), (8, 16)])
def test_zb1p_idles_exactly_a_third_of_1f1b(pp, m):
    # F = I = W = 1; 1F1B's B = I + W = 2. Each rank idles pp-1 against 1F1B's 3(pp-1).
    one = simulate(make_schedule("1f1b", pp, m), pp, m, forward_cost=1, backward_cost=2)
    zb = simulate(make_schedule("zb1p", pp, m), pp, m, forward_cost=1, input_cost=1, weight_cost=1)
    assert one.idle == 3 * pp * (pp - 1) and one.makespan == 3 * m + 3 * (pp - 1)
    assert zb.idle == pp * (pp - 1) and zb.makespan == 3 * m + pp - 1
    assert 3 * zb.idle == one.idle
    # As idle time over work (the zero-bubble repository's "bubble rate"): (pp-1)/3m against (pp-1)/m.
    assert 3 * zb.idle / (3 * m * pp) == one.idle / (3 * m * pp)
    assert zb.bubble == pytest.approx((pp - 1) / (3 * m + pp - 1), abs=1e-12)
    assert theoretical_bubble("zb1p", pp, m) == (pp - 1) / (3 * m + pp - 1)


@pytest.mark.parametrize("pp,m", [(2, 3), (2, 8), (3, 5), (4, 7), (4, 8), (5, 9), (8, 15), (8, 16)])
def test_zbv_idles_only_the_fill(pp, m):
    # Per chunk F = I = W = 1. The last rank cannot start before its first input has crossed pp-1
    # stages; from m >= 2pp-1 on that fill, pp-1 per rank, is all the idle time there is.
    zb = simulate(make_schedule("zbv", pp, m, 2), pp, m, 2, forward_cost=1, input_cost=1, weight_cost=1, layout="v")
    assert zb.idle == pp * (pp - 1) and zb.makespan == 6 * m + pp - 1
    assert theoretical_bubble("zbv", pp, m, 2) == (pp - 1) / (6 * m + pp - 1)
    assert zb.bubble == pytest.approx(theoretical_bubble("zbv", pp, m, 2), abs=1e-12)


@pytest.mark.parametrize("pp,m", [(1, 2), (2, 4), (2, 9), (3, 6), (4, 8), (4, 11), (8, 16), (8, 24)])
def test_dualpipev_idles_only_the_fill_and_holds_half_a_micro_batch_more(pp, m):
    # Per chunk F = I = W = 1, B = 2, its pairs run one after the other: the fill, pp-1 per rank, as zbv.
    plan = make_schedule("dualpipev", pp, m, 2)
    sim = simulate(plan, pp, m, 2, forward_cost=1, input_cost=1, weight_cost=1, layout="v")
    assert sim.idle == pp * (pp - 1) and sim.makespan == 6 * m + pp - 1
    assert theoretical_bubble("dualpipev", pp, m, 2) == (pp - 1) / (6 * m + pp - 1)
    assert sim.bubble == pytest.approx(theoretical_bubble("dualpipev", pp, m, 2), abs=1e-12)
    # Every rank holds 2pp+1 chunks at its peak, pp + 1/2 micro-batches: zbv's pp and one chunk more.
    assert [memory.peak_in_flight(a, 2) for a in plan.values()] == [pp + 0.5] * pp


def test_theoretical_bubbles_with_few_micro_batches():
    # zb1p, m < pp: the last rank holds every W, its last I ends at pp-1+2m, and the gradient then
    # crosses pp-1 ranks before rank 0's last W: 2m+2pp-1 in all, 2pp-1-m idle per rank.
    assert theoretical_bubble("zb1p", 4, 2) == 5 / 11
    sim = simulate(make_schedule("zb1p", 4, 2), 4, 2)
    assert (sim.makespan, sim.idle) == (11, 20)
    # zbv, m < 2pp-1: the cut orders idle max(pp-1, 2(2pp-1-m)) chunk actions per rank.
    assert theoretical_bubble("zbv", 4, 4, 2) == 6 / 30
    assert theoretical_bubble("zbv", 4, 8, 2) == 3 / 51
    sim = simulate(make_schedule("zbv", 4, 4, 2), 4, 4, 2, layout="v")
    assert (sim.makespan, sim.idle) == (30, 24)


def test_simulated_costs_per_kind_and_stage():
    # pp=2, m=1: rank 0 runs 0F0 0I0 0W0, rank 1 1F0 1I0 1W0 (its one W held, then flushed).
    order = {r: zb1p(r, 2, 1) for r in range(2)}  # stage 0 split too
    sim = simulate(order, 2, 1, forward_cost=1, input_cost=[1, 3], weight_cost=[2, 4])
    assert {r: [(s, e) for s, e, _ in t] for r, t in sim.timeline.items()} == {
        0: [(0, 1), (5, 6), (6, 8)], 1: [(1, 2), (2, 5), (5, 9)]}
    # Left out, I and W each cost half of the stage's B.
    sim = simulate(order, 2, 1, backward_cost=[4, 6])
    assert [(s, e) for s, e, _ in sim.timeline[1]] == [(1, 2), (2, 5), (5, 8)]
    with pytest.raises(ScheduleError, match=r"^weight_cost has 1 entries; expected one per stage \(2\)$"):
        simulate(make_schedule("zb1p", 2, 1), 2, 1, weight_cost=[1])


def test_a_b_and_a_split_backward_mix_across_stages():
    # Stage 1 runs one B, stage 0 splits: 0I0 waits for 1B0's gradient.
    schedule = {0: parse("0F0 0I0 0W0"), 1: parse("1F0 1B0")}
    sim = simulate(schedule, 2, 1)
    assert [(s, e, str(a)) for s, e, a in sim.timeline[0]] == [(0, 1, "0F0"), (4, 5, "0I0"), (5, 6, "0W0")]
    assert sim.peak_in_flight == {0: 1, 1: 1}


# --- validation messages ------------------------------------------------------------------

def test_validate_input_gradient_before_forward():
    assert error({0: "0I0 0F0 0W0"}, 1, 1) == (
        "rank 0 step 0: 0I0 runs before its forward 0F0\n"
        "rank 0 | [0I0] 0F0 0W0")


def test_validate_weight_gradient_before_input_gradient():
    assert error({0: "0F0 0W0 0I0"}, 1, 1) == (
        "rank 0 step 1: 0W0 runs before its input gradient 0I0\n"
        "rank 0 | 0F0 [0W0] 0I0")


def test_validate_b_and_i_for_the_same_pair():
    assert error({0: "0F0 0B0 0I0 0W0"}, 1, 1) == (
        "rank 0 step 2: 0I0 after 0B0: a micro-batch's backward on a stage is one B, or one I and one W\n"
        "rank 0 | 0F0 0B0 [0I0] 0W0")
    assert error({0: "0F0 0I0 0B0"}, 1, 1).splitlines()[0] == (
        "rank 0 step 2: 0B0 after 0I0: a micro-batch's backward on a stage is one B, or one I and one W")


def test_validate_missing_weight_gradient():
    assert error({0: "0F0 0I0 0W0", 1: "1F0 1I0"}, 2, 1) == (
        "missing 1W0 on rank 1\n"
        "rank 0 | 0F0 0I0 0W0\n"
        "rank 1 | 1F0 [1I0]")


def test_validate_other_split_messages():
    assert error({0: "0F0 0I0 0W0 0W0"}, 1, 1).splitlines()[0] == "rank 0 step 3: duplicate 0W0"
    assert error({0: "0F0 0X0"}, 1, 1).splitlines()[0] == (
        "rank 0 step 1: unknown kind 'X' (expected 'F', 'B', 'I' or 'W')")
    assert error({0: "0F0 0I0"}, 1, 1, forward_only=True).splitlines()[0] == (
        "rank 0 step 1: 0I0 is a backward in a forward-only schedule")
    # zbv's order on the default "loop" layout: stage 3 is rank 1's there.
    with pytest.raises(ScheduleError) as info:
        validate(make_schedule("zbv", 2, 1, 2), 2, 1, 2)
    assert str(info.value).splitlines()[0] == "rank 0 step 1: 3F0 belongs to rank 1"


def test_bad_zero_bubble_arguments():
    for fn in (make_schedule, theoretical_bubble):
        with pytest.raises(ScheduleError) as info:
            fn("zbv", 4, 8, 3)
        assert str(info.value) == ("zbv runs two stages per rank in a V, so virtual must be 2 (got 3); "
                                   "use virtual 2, or zb1p for one stage per rank")
        with pytest.raises(ScheduleError) as info:
            fn("dualpipev", 4, 8, 1)
        assert str(info.value) == ("dualpipev runs two stages per rank in a V, so virtual must be 2 (got 1); "
                                   "use virtual 2, or zb1p for one stage per rank")
        with pytest.raises(ScheduleError) as info:
            fn("dualpipev", 4, 7, 2)
        assert str(info.value) == ("dualpipev needs at least 2 x pp = 8 micro-batches (got 7); use 8 or more, "
                                   "or zbv for fewer")
        with pytest.raises(ScheduleError) as info:
            fn("zb1p", 4, 8, 2)
        assert str(info.value) == "zb1p runs one stage per rank, so virtual must be 1 (got 2); use zbv for virtual = 2"


# --- point-to-point ------------------------------------------------------------------------

def test_messages_of_split_backwards():
    # I sends and receives what B does; W works on what its I left on the rank.
    assert messages(Action(1, 3, "I"), 3) == (("grad", 2, 1, 3), [("grad", 1, 0, 3)])
    assert messages(Action(1, 3, "W"), 3) == (None, [])


@pytest.mark.parametrize("name,v", [("zb1p", 1), ("zbv", 2), ("dualpipev", 2)])
def test_zero_bubble_plans_run_in_order_and_match_on_both_ends(name, v):
    # Lead 0 (NCCL, operations between two ranks run in order) is proven deadlock-free; lead 1 (gloo,
    # receives posted one action early) keeps the sends and the order each pair matches on.
    layout = schedule_layout(name)
    for pp in range(1, 9):
        for m in (1, 2, pp - 1, pp, pp + 1, 2 * pp - 1, 2 * pp, 3 * pp + 1):
            if m < (2 * pp if name == "dualpipev" else 1):
                continue
            schedule = make_schedule(name, pp, m, v)
            check_plan(schedule, p2p_plan(schedule, pp, m, v, 0, layout), pp, v, layout)
            early = p2p_plan(schedule, pp, m, v, 1, layout)
            check_matching({r: [b for slot in slots for b in slot] for r, slots in early.items()}, pp, layout)


def test_zbv_last_rank_runs_the_v_turn_without_messages():
    # pp=2, m=1: stage 1 hands its activation to stage 2 on the same rank, and stage 2 its gradient
    # back; rank 0 holds the first and the last stage, so it sends the activation and gets one gradient.
    plan = p2p_plan(make_schedule("zbv", 2, 1, 2), 2, 1, 2, layout="v")
    ops = {r: [op for slot in slots for batch in slot for op in batch] for r, slots in plan.items()}
    assert ops == {0: [("send", ("act", 0, 1, 0)), ("recv", ("act", 2, 3, 0)), ("send", ("grad", 3, 2, 0)),
                       ("recv", ("grad", 1, 0, 0))],
                   1: [("recv", ("act", 0, 1, 0)), ("send", ("act", 2, 3, 0)), ("recv", ("grad", 3, 2, 0)),
                       ("send", ("grad", 1, 0, 0))]}


def test_forward_only_plans_and_the_shape_probe_on_the_v_layout():
    for pp in range(1, 9):
        for m in (1, 3, 8):
            schedule = make_schedule("forward-only", pp, m, 2, layout="v")
            check_plan(schedule, p2p_plan(schedule, pp, m, 2, 0, "v"), pp, 2, "v")
        check_shape_plan(shape_plan(pp, 2, "v"), pp, "v")

    def shape(src, dst):
        return ("shape", src, dst, 0)

    # Stages 0 1 2 3 on ranks 0 1 1 0: the turn at stages 1 -> 2 stays on rank 1.
    assert shape_plan(2, 2, "v") == {
        0: [("run", 0), [("send", shape(0, 1))], [("recv", shape(2, 3))], ("run", 3)],
        1: [[("recv", shape(0, 1))], ("run", 1), ("run", 2), [("send", shape(2, 3))]],
    }


# --- peak memory -------------------------------------------------------------------------------

def test_peak_in_flight_counts_a_micro_batch_until_its_w():
    assert memory.peak_in_flight(parse("0F0 0F1 0I0 0W0 0I1 0W1")) == 2
    assert memory.peak_in_flight(parse("0F0 0I0 0F1 0I1 0W0 0W1")) == 2  # I frees nothing in the count
    assert memory.peak_in_flight(parse("0F0 0I0 0W0 0F1 0I1 0W1")) == 1


def test_zero_bubble_peaks_are_1f1b_s_peak_over_the_pipeline():
    # 1F1B holds min(m, pp - r) on rank r, min(m, pp) at most. zb1p and zbv hold that most on every
    # rank: the W's they move into the drain keep micro-batches alive on the later ranks (see
    # zero_bubble's docstring for why no schedule can keep 1F1B's own count per rank and a third of its
    # bubble). zbv's chunks are half a rank's layers each, counted 1/2.
    for pp in range(1, 9):
        for m in range(1, 17):
            one = [memory.peak_in_flight(a) for a in make_schedule("1f1b", pp, m).values()]
            zb1p = [memory.peak_in_flight(a) for a in make_schedule("zb1p", pp, m).values()]
            zbv = [memory.peak_in_flight(a, 2) for a in make_schedule("zbv", pp, m, 2).values()]
            assert max(one) == min(m, pp)
            assert zb1p == [min(m, pp)] * pp, (pp, m)
            assert max(zbv) <= max(one), (pp, m)
            if m >= 2 * pp - 1:
                assert zbv == [pp] * pp, (pp, m)
    assert [memory.peak_in_flight(a) for a in make_schedule("1f1b", 4, 8).values()] == [4, 3, 2, 1]


def test_the_memory_plan_places_zbv_stages_in_a_v():
    from tests.test_memory import GPT, layout
    from plait.model import build_gpt, count_params

    # pp=2 x 2 chunks: rank 0 holds stages 0 and 3, the embedding and the tied head, so the tied weight
    # is one Parameter there and no rank keeps a second copy; the loop layout splits them.
    v = memory.plan_layout(GPT, layout(pp=2, schedule="zbv", virtual_stages=2))
    loop = memory.plan_layout(GPT, layout(pp=2, schedule="interleaved-1f1b", virtual_stages=2))
    n = count_params(build_gpt(GPT))
    assert sum(p.weights for p in v) == 4 * n
    assert sum(p.weights for p in loop) == 4 * (n + GPT.vocab_size * GPT.n_embd)


def test_the_memory_plan_holds_half_a_micro_batch_more_under_dualpipev():
    from tests.test_memory import GPT, layout

    # The same V as zbv, the same weights; activations grow with the micro-batches in flight, 1 for zbv at
    # m=1 and 2 at m=4 (pp), 2.5 for dualpipev at m=4 (pp + 1/2): half of one micro-batch's more than zbv.
    def plan(schedule, m):
        return memory.plan_layout(GPT, layout(pp=2, schedule=schedule, virtual_stages=2, num_microbatches=m))

    zbv1, zbv4, dpv = plan("zbv", 1), plan("zbv", 4), plan("dualpipev", 4)
    assert [p.weights for p in dpv] == [p.weights for p in zbv4]
    for one, two, dual in zip(zbv1, zbv4, dpv):
        per_mb = two.activations - one.activations
        assert per_mb > 0 and abs((dual.activations - two.activations) - per_mb / 2) <= 1
