"""The harness's NCCL completion rule: an async result lands only when its own Work is waited on."""

import torch
import torch.distributed as dist

from plait.model import GPTConfig, build_gpt, gpt_loss
from tests.distributed.harness import spawn


def observe_landing():
    """What the caller's tensors hold before and after each kind of wait."""
    rank = dist.get_rank()
    seen = {}
    x = torch.full((3,), float(rank + 1))
    work = dist.all_reduce(x, async_op=True)
    seen["all_reduce before wait"] = x.tolist()
    work.get_future().then(lambda _f: None).wait()  # a child future orders nothing
    seen["all_reduce after a then() child"] = x.tolist()
    work.wait()
    seen["all_reduce after its Work"] = x.tolist()

    y = torch.full((2,), float(rank + 1))
    work = dist.all_reduce(y, async_op=True)
    work.get_future().wait()  # the work's own future does order it
    seen["all_reduce after its own future"] = y.tolist()

    peer = 1 - rank
    out = torch.full((2,), 10.0 * (rank + 1))
    into = torch.zeros(2)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, into, peer)])
    works[0].wait()
    seen["receive before its wait"] = into.tolist()
    works[1].wait()
    seen["receive after its wait"] = into.tolist()
    return seen


def test_results_land_only_at_their_own_wait():
    ranks = spawn(observe_landing, 2, timeout=120)
    assert ranks[0] == {
        "all_reduce before wait": [1.0, 1.0, 1.0],
        "all_reduce after a then() child": [1.0, 1.0, 1.0],
        "all_reduce after its Work": [3.0, 3.0, 3.0],
        "all_reduce after its own future": [3.0, 3.0],
        "receive before its wait": [0.0, 0.0],
        "receive after its wait": [20.0, 20.0],
    }
    assert ranks[1]["receive after its wait"] == [10.0, 10.0]


CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)


def count_reads_in_steps(dp, pp, zero=0):
    """Run two warm-up steps and one counted step; count every read of device data by the host."""
    import plait

    mesh = plait.make_mesh(dp=dp, pp=pp)
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = plait.Engine(layers, gpt_loss, mesh, microbatches=2, bucket_mb=0.004)
    if zero:  # ZeRO (plait.parallel.zero): the shard step and the all-gather read nothing either
        from plait.parallel.zero import ShardedOptimizer
        opt = ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, fused=True, zero=zero)
    else:
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-2, fused=True)  # as plait train steps it
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)
    y = torch.roll(x, -1, dims=1)
    counts: dict[str, int] = {}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        return wrapper

    reads = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    for step in range(3):
        if step == 2:  # the shape probe and the optimizer's first step are behind us
            saved = {name: getattr(torch.Tensor, name) for name in reads}
            saved_tensor = torch.tensor
            for name in reads:
                setattr(torch.Tensor, name, counting(name, saved[name]))
            torch.tensor = counting("torch.tensor", saved_tensor)
        try:
            engine.train_step(x, y)
            engine.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            if step == 2:
                for name in reads:
                    setattr(torch.Tensor, name, saved[name])
                torch.tensor = saved_tensor
    return counts


def test_a_step_reads_the_device_once():
    # [Note: one read per step] in engine.py: the loss, the gradient norm and the used-flags
    # come back together; nothing else in train_step, clip_grad_norm_ or the optimizer reads.
    for dp, pp, zero in [(2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 1, 1), (2, 2, 1), (2, 2, 2)]:
        ranks = spawn(count_reads_in_steps, dp * pp, dp, pp, zero, timeout=120)
        for counts in ranks:
            assert counts == {"tolist": 1}, (dp, pp, zero, counts)
