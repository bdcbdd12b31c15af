"""benchmarks/pipeline.py's activation count: what a deferred micro-batch holds for W is counted
the same whichever way its linear layers deferred (the count once missed the layer inputs that
the queue kept alive after autograd had dropped them as saved tensors)."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.pipeline import SavedActivations  # noqa: E402

from plait.parallel.weight_grad import WeightGradStore, defer_linears, deferred_forward, held_inputs  # noqa: E402


@pytest.mark.parametrize("path", ["function", "native"])
def test_a_micro_batch_waiting_for_w_counts_its_inputs_and_output_gradients(path):
    """F0, I0, F1 on Linear(8, 32) -> tanh -> Linear(32, 8) -> (.)^2, 4 rows of float32. At F1's
    last save the rank holds, for micro-batch 0, its two layer inputs (4x8 and 4x32) and their
    output gradients (4x32 and 4x8) for W, and for micro-batch 1 the input (4x8), tanh's output
    (4x32: saved, and the second layer's input) and the squared output's input (4x8):
    (4*8 + 4*32) * 4 B * 2 + (4*8 + 4*32 + 4*8) * 4 B = 2048 B. The weights count nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8))
    defer_linears([model])
    store = WeightGradStore()
    counter = SavedActivations(model.parameters(), lambda: [*store.held(), *held_inputs()])
    way = deferred_forward if path == "native" else contextlib.nullcontext
    losses = {}
    with counter():
        for i in (0, 1):
            x = torch.randn(4, 8, requires_grad=True)
            with way():
                losses[i] = model(x).square().sum()
            del x
            if i == 0:
                with store.deferring(0):
                    losses.pop(0).backward()
    assert counter.peak == 2048


def test_idle_report_of_a_hand_made_step():
    """1F1B at pp=2, m=2, one step as two ranks' clocks might give it: the same times as
    test_schedule's replay (makespan 14, busy 19), except that the gradient for 0B0 arrives 0.5 s
    late. The replay gives each action its own time and no message a cost, so 9/28; each share
    and median below is worked out by hand from the windows."""
    from benchmarks.pipeline_idle import format_report, idle_report
    from plait.parallel.schedule import Action

    def acts(rank, *spans):
        order = ["F0", "F1", "B0", "B1"] if rank == 0 else ["F0", "B0", "F1", "B1"]
        return [(Action(rank, int(a[1]), a[0]), s, e) for a, (s, e) in zip(order, spans)]

    step = [acts(0, (0, 1), (1, 3), (8.5, 13.5), (13.5, 14.5)), acts(1, (1, 4), (4, 8), (8, 9), (9, 11))]
    report = idle_report([[step[0]], [step[1]]], pp=2, m=2, virtual=1, layout="loop")
    assert report["replayed"] == pytest.approx(9 / 28)
    # rank 0: 0F1 all overlapped (2 s), 0B0 half (2.5 of 5 s), of 9 s; rank 1: 1F0 2 of 3 s, 1F1 0.5, 1B1 2, of 10 s
    assert report["overlapped"] == pytest.approx([0.5, 0.45])
    assert report["kinds"] == {("F", 0): (1, 2), ("B", 0): (1, None), ("F", 1): (None, None), ("B", 1): (4, 2)}
    assert report["spread"] == pytest.approx(5 / 12)  # the median of 1/3, 1/3, 2/3, 2/3, 1/2, 1/2, 1/3, 1/3
    assert (report["steady"], report["pace"]) == (pytest.approx(9 / 28), 0)  # one step: each rank at its usual pace
    assert format_report("1f1b m=2", report, measured=0.35, simulated=0.3) == (
        "  1f1b m=2: bubble measured 0.350, replayed 0.321, steady 0.321, simulated 0.300; pace 0.0 %; "
        "overlapped 0.50 / 0.45; spread 41.7 %\n"
        "      alone/overlapped ms: F0 1000.0/2000.0  B0 1000.0/-  F1 -/-  B1 4000.0/2000.0")


def test_steady_replay_takes_out_whole_step_changes_of_a_ranks_pace():
    """1F1B at pp=2, m=2 over two steps: F 1 s and B 2 s on both ranks, then a step in which rank 1
    runs at half speed. Worked by hand: the first replays to a span of 9 s (bubble 1 - 12/18), the
    second to 15 s (1 - 18/30). Rank 1's usual compute is the median of 6 and 12 s, 9 s: at that
    pace (F 1.5, B 3) both steps replay to a span of 12 s, 1 - 15/24 = 0.375. Pace: rank 0 never
    changes, rank 1 is 1/3 above and 1/3 below its usual, so the median of 0, 0, 1/3, 1/3 is 1/6."""
    from benchmarks.pipeline_idle import idle_report
    from plait.parallel.schedule import Action

    def step(f, b):  # each rank's actions back to back from 0: only their durations are read
        out = []
        for rank, order, (fr, br) in ((0, ["F0", "F1", "B0", "B1"], (1, 2)), (1, ["F0", "B0", "F1", "B1"], (f, b))):
            t, acts = 0.0, []
            for a in order:
                d = fr if a[0] == "F" else br
                acts.append((Action(rank, int(a[1]), a[0]), t, t + d))
                t += d
            out.append(acts)
        return out

    steps = [step(1, 2), step(2, 4)]
    report = idle_report([[s[0] for s in steps], [s[1] for s in steps]], pp=2, m=2, virtual=1, layout="loop")
    assert report["replayed"] == pytest.approx((1 / 3 + 0.4) / 2)
    assert report["steady"] == pytest.approx(0.375)
    assert report["pace"] == pytest.approx(1 / 6)
