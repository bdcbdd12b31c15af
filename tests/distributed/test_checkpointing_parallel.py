"""Activation checkpointing across processes: dp=2 x pp=2 (1F1B, and the zero-bubble schedules and
dualpipev, whose W then leaves the checkpointed layers whole) gives one plain process's parameters."""

import pytest
import torch
from torch import nn

import plait
from plait.model import GPTConfig, build_gpt, gpt_loss
from tests.distributed.harness import spawn

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)
GLOBAL_BATCH, STEPS = 8, 2


def global_batch(step):
    g = torch.Generator().manual_seed(900 + step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def reference():
    model = nn.Sequential(*[layer.double() for layer in build_gpt(CFG, seed=0)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        gpt_loss(model(global_batch(step)[0]), global_batch(step)[1]).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def train(mode, schedule="1f1b", virtual=1, microbatches=2):
    mesh = plait.make_mesh(dp=2, pp=2)
    dp_rank = mesh["dp"].get_local_rank()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=microbatches, bucket_mb=0.004,
                          activation_checkpointing=mode, virtual_stages=virtual)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = global_batch(step)
        rows = slice(dp_rank * GLOBAL_BATCH // 2, (dp_rank + 1) * GLOBAL_BATCH // 2)
        engine.train_step(x[rows], y[rows])
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in engine.state_dict().items()}


@pytest.mark.parametrize("mode,schedule,virtual,m", [("full", "1f1b", 1, 2), ("selective", "1f1b", 1, 2),
                                                     ("full", "zb1p", 1, 2), ("selective", "zbv", 2, 2),
                                                     ("full", "dualpipev", 2, 4)])
def test_dp2_pp2_with_checkpointing_equals_one_plain_process(mode, schedule, virtual, m):
    ref = reference()
    ranks = spawn(train, 4, mode, schedule, virtual, m, timeout=300)
    seen = set()
    for state in ranks:
        for k, v in state.items():
            assert (v - ref[k]).abs().max().item() < 1e-9, k
            seen.add(k)
    assert seen == set(ref)  # every parameter lives on some rank, under its one-process name
