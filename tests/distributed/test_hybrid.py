"""dp x pp on one mesh, with GPT-2's tied embedding cut across stages: still one process's result."""

import pytest
import torch
from torch import nn

import plait
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait.parallel.zero import ShardedOptimizer
from tests.distributed.harness import spawn

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=4, n_head=2, n_embd=16, tie_embeddings=True)
GLOBAL_BATCH, STEPS, CLIP = 8, 3, 0.5
LAYOUTS = [("1f1b", 2, 1), ("interleaved-1f1b", 2, 2), ("gpipe", 4, 1)]


def global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def reference():
    model = nn.Sequential(*[layer.double() for layer in build_gpt(CFG, seed=0)])
    assert model[-1].lm_head.weight is model[0].wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    norms = []
    for step in range(STEPS):
        x, y = global_batch(step)
        gpt_loss(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
    return model.state_dict(), norms


def train_hybrid(zero=0, native=False, overlap=False):
    mesh = plait.make_mesh(dp=2, pp=2)
    dp_rank = mesh["dp"].get_local_rank()
    out = []
    for schedule, m, virtual in LAYOUTS:
        layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
        engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=m, virtual_stages=virtual,
                              bucket_mb=0.004)
        if zero:  # ZeRO: each dp rank steps half of each bucket (plait.parallel.zero)
            opt = ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, zero=zero,
                                   overlap_gather=overlap)
            engine.grad_sync.native_scatter = native  # NCCL's reduce-scatter, or gloo's all-reduce and a slice
        else:
            opt = torch.optim.AdamW(engine.parameters(), lr=1e-2, weight_decay=0.1)
        norms = []
        for step in range(STEPS):
            x, y = global_batch(step)
            rows = slice(dp_rank * GLOBAL_BATCH // 2, (dp_rank + 1) * GLOBAL_BATCH // 2)
            engine.train_step(x[rows], y[rows])
            norms.append(engine.clip_grad_norm_(CLIP))
            opt.step()
            opt.zero_grad()
        out.append({"state": {k: v.clone() for k, v in engine.state_dict().items()}, "norms": norms,
                    "pp_rank": mesh["pp"].get_local_rank(), "dp_rank": dp_rank})
    return out


@pytest.mark.parametrize("zero,native,overlap", [(0, False, False), (1, False, False), (2, False, False),
                                                (2, True, False), (1, True, True)],
                         ids=["zero0", "zero1", "zero2", "zero2-reduce-scatter", "zero1-overlapped-gather"])
def test_dp2_pp2_with_tied_embeddings_equals_one_process(zero, native, overlap):
    ref_state, ref_norms = reference()
    ranks = spawn(train_hybrid, 4, zero, native, overlap, timeout=300)
    assert [(r[0]["pp_rank"], r[0]["dp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for n, (schedule, m, virtual) in enumerate(LAYOUTS):
        state = {}
        for r in ranks:
            for key, value in r[n]["state"].items():
                if key in state:  # replicas, and the tied copies, are bit-identical
                    assert torch.equal(state[key], value), (schedule, key)
                state[key] = value
        assert state.keys() == ref_state.keys()
        for key, want in ref_state.items():
            diff = (state[key] - want).abs().max().item()
            assert diff <= 1e-9, (schedule, key, diff)
        # The two tied copies live on different ranks and are still equal.
        assert torch.equal(state["0.wte.weight"], state[f"{CFG.n_layer + 1}.lm_head.weight"])
        for r in ranks:
            assert max(abs(a - b) for a, b in zip(r[n]["norms"], ref_norms)) <= 1e-9, schedule
