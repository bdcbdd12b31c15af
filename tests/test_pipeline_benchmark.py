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
