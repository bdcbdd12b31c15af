"""Data parallelism is exact: dp ranks end where one process on the whole batch ends."""

import pytest
import torch
from torch import nn

import plait
from plait import distributed
from plait.model import GPTConfig, build_gpt, gpt_loss
from tests.distributed.harness import spawn, train_one_process

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)
GLOBAL_BATCH, STEPS = 8, 3
SMALL_BUCKETS_MB, ONE_BUCKET_MB = 0.004, 25.0  # 4 KiB splits the model into many buckets


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def reference(steps=STEPS, extra_layers=()):
    """One process, the whole global batch each step, float64."""
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)] + [m.double() for m in extra_layers]
    return train_one_process(layers, map(global_batch, range(steps)), gpt_loss, make_optimizer)


def train_dp(layouts):
    """On each rank: for each (dp, microbatches, bucket_mb), train STEPS steps; return states and losses."""
    mesh = plait.make_mesh(dp=distributed.world_size(), pp=1)
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    out = []
    for microbatches, bucket_mb in layouts:
        # Each rank starts from different values: the engine must broadcast rank 0's.
        layers = [layer.double() for layer in build_gpt(CFG, seed=distributed.rank())]
        engine = plait.Engine(layers, gpt_loss, mesh, microbatches=microbatches, bucket_mb=bucket_mb)
        opt = make_optimizer(engine.parameters())
        losses = []
        for step in range(STEPS):
            x, y = global_batch(step)
            rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
            losses.append(engine.train_step(x[rows], y[rows]))
            opt.step()
            opt.zero_grad()
        state = {k: v.clone() for k, v in engine.state_dict().items()}
        out.append({"state": state, "losses": losses, "buckets": len(engine.grad_sync.buckets),
                    "hidden": engine.grad_sync.stats.hidden_fraction})
    return out


LAYOUTS = [(1, SMALL_BUCKETS_MB), (1, ONE_BUCKET_MB), (2, SMALL_BUCKETS_MB), (2, ONE_BUCKET_MB)]


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_equals_one_process_on_the_global_batch(dp):
    ref_state, ref_losses = reference()
    ranks = spawn(train_dp, dp, LAYOUTS)
    for i, (microbatches, bucket_mb) in enumerate(LAYOUTS):
        results = [r[i] for r in ranks]
        if bucket_mb == SMALL_BUCKETS_MB:
            assert results[0]["buckets"] >= 4
        else:
            assert results[0]["buckets"] == 1
        for key, want in ref_state.items():
            diff = (results[0]["state"][key] - want).abs().max().item()
            assert diff <= 1e-9, (dp, microbatches, bucket_mb, key, diff)
        for other in results[1:]:  # replicas are bit-identical
            for key, value in results[0]["state"].items():
                assert torch.equal(value, other["state"][key]), (dp, microbatches, key)
            assert other["losses"] == results[0]["losses"]
        assert max(abs(a - b) for a, b in zip(results[0]["losses"], ref_losses)) <= 1e-12


class Unused(nn.Module):
    """Passes its input through; its parameter never takes part in the loss."""

    def __init__(self):
        super().__init__()
        self.never = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x


class UsedOnRankZero(nn.Module):
    """Adds its parameter to the logits on rank 0 only: the other ranks produce no gradient for it."""

    def __init__(self):
        super().__init__()
        self.sometimes = nn.Parameter(torch.zeros(CFG.vocab_size))

    def forward(self, x):
        return x + self.sometimes if distributed.rank() == 0 else x


def train_with_unused_parameters():
    mesh = plait.make_mesh(dp=distributed.world_size(), pp=1)
    dp_rank = mesh["dp"].get_local_rank()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)] + [Unused().double(), UsedOnRankZero().double()]
    engine = plait.Engine(layers, gpt_loss, mesh, bucket_mb=SMALL_BUCKETS_MB)
    opt = make_optimizer(engine.parameters())
    grads = []
    for step in range(STEPS):
        x, y = global_batch(step)
        rows = slice(dp_rank * GLOBAL_BATCH // 2, (dp_rank + 1) * GLOBAL_BATCH // 2)
        engine.train_step(x[rows], y[rows])
        grads.append({"never": layers[-2].never.grad, "sometimes": layers[-1].sometimes.grad.clone()})
        opt.step()
        opt.zero_grad()
    return {"grads": grads, "never": layers[-2].never.detach().clone()}


def test_parameters_without_gradients_do_not_hang():
    results = spawn(train_with_unused_parameters, 2, timeout=120)
    for r in results:
        # Never used anywhere: no gradient, as in one process, so AdamW leaves it alone.
        assert all(g["never"] is None for g in r["grads"])
        assert torch.equal(r["never"], torch.ones(3, dtype=torch.float64))
    for a, b in zip(results[0]["grads"], results[1]["grads"]):
        # Used on rank 0 only: both ranks hold the same averaged gradient, and it is not zero.
        assert torch.equal(a["sometimes"], b["sometimes"]) and a["sometimes"].abs().sum() > 0
