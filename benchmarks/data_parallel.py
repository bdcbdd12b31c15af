"""plait's data parallelism against torch's DistributedDataParallel, side by side in one run.

    .venv/bin/python benchmarks/data_parallel.py [--rounds 48] [--steps 1] [--bucket-mb 25]

Trains the same GPT (about 3.7 M parameters, float32) on the same global
batch, one thread per process, as: one process on the whole batch; plait
dp=2; DDP dp=2 (`bucket_cap_mb` = --bucket-mb, its defaults otherwise); and,
as the ceiling that no engine can beat here, two processes each on half the
batch with no communication at all (what two cores do side by side).

This machine's speed drifts by tens of percent over a minute, so the three
are measured in the same two processes, interleaved: each round runs a few
steps of each, in rotating order, and the table reports medians over all
rounds. The one-process run goes on rank 0 while rank 1 waits at a barrier.

Columns: median step time; tokens/s; plait/DDP step-time ratio; scaling
efficiency (one-process step time / dp=2 step time / 2); and, for plait,
the share of all-reduce time hidden behind backward (1 - time waited after
backward / the buckets' launch-to-completion time). Below the table, the
same ratios taken round by round (each round's contenders ran minutes
apart at most) with their median and quartiles over the rounds: the drift
between rounds cancels out of these.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.distributed.harness import spawn  # noqa: E402

import plait  # noqa: E402
from plait.model import GPTConfig, build_gpt, count_params, gpt_loss  # noqa: E402

CFG = GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256)
GLOBAL_BATCH = 16  # sequences per step; --global-batch changes it


def batch(step: int, rows: slice):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x[rows], torch.roll(x, -1, dims=1)[rows]


def make_runners(bucket_mb: float) -> dict:
    """name -> step(i) for each contender, all built in this process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    single = plait.Engine(build_gpt(CFG, seed=0), gpt_loss)
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-4)

    ours = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, plait.make_mesh(dp=world), bucket_mb=bucket_mb)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*build_gpt(CFG, seed=0)), bucket_cap_mb=bucket_mb)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    hidden: list[float] = []

    alone = plait.Engine(build_gpt(CFG, seed=0), gpt_loss)
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-4)

    def run_alone(i):
        alone.train_step(*batch(i, share))
        alone_opt.step()
        alone_opt.zero_grad(set_to_none=True)

    def run_single(i):
        if rank == 0:
            single.train_step(*batch(i, slice(None)))
            single_opt.step()
            single_opt.zero_grad(set_to_none=True)

    def run_plait(i):
        ours.train_step(*batch(i, share))
        hidden.append(ours.grad_sync.stats.hidden_fraction)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def run_ddp(i):
        x, y = batch(i, share)
        loss = gpt_loss(ddp(x), y)
        loss.backward()
        # plait's train_step returns the global mean loss; do the same work here.
        dist.all_reduce(loss.detach().clone())
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)

    return {"one process": run_single, "plait dp=2": run_plait, "torch DDP dp=2": run_ddp,
            "no comm (ceiling)": run_alone,
            "_hidden": hidden, "_buckets": len(ours.grad_sync.buckets)}


def measure(rounds: int, steps: int, bucket_mb: float, global_batch: int) -> dict:
    global GLOBAL_BATCH
    GLOBAL_BATCH = global_batch  # this is a fresh process: carry the command line's choice over
    runners = make_runners(bucket_mb)
    hidden, buckets = runners.pop("_hidden"), runners.pop("_buckets")
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocator, autograd graph caches, DDP's first-iteration bucketing
        for i in range(2):
            runners[name](i)
    hidden.clear()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                runners[name](r * steps + i)
                times[name].append(time.perf_counter() - t0)
    return {"times": times, "hidden": statistics.median(hidden), "buckets": buckets}


def main() -> None:
    global GLOBAL_BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=48, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=1, help="steps of each contender per round")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for both engines")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH, help="sequences per step (even)")
    args = parser.parse_args()
    GLOBAL_BATCH = args.global_batch
    print(f"GPT {CFG.n_layer} layers x {CFG.n_embd}, vocab {CFG.vocab_size}: "
          f"{count_params(build_gpt(CFG, device='meta')) / 1e6:.2f} M parameters, float32; global batch "
          f"{GLOBAL_BATCH} x {CFG.block_size} tokens; {args.rounds} rounds x {args.steps} steps each; "
          f"1 thread per process; buckets {args.bucket_mb:g} MiB; torch {torch.__version__}")
    result = spawn(measure, 2, args.rounds, args.steps, args.bucket_mb, GLOBAL_BATCH, timeout=1800)[0]
    med = {name: statistics.median(ts) for name, ts in result["times"].items()}
    t1, t_ddp = med["one process"], med["torch DDP dp=2"]
    tokens = GLOBAL_BATCH * CFG.block_size
    print(f"\n{'run':<18} {'step (ms)':>10} {'tokens/s':>10} {'vs DDP':>8} {'scaling':>8} {'hidden':>8}")
    for name, t in med.items():
        line = f"{name:<18} {t * 1e3:>10.1f} {tokens / t:>10,.0f}"
        if name != "one process":
            line += f" {t / t_ddp:>8.3f} {t1 / t / 2:>8.3f}"
            line += f" {result['hidden']:>8.0%}" if name.startswith("plait") else f" {'-':>8}"
        print(line)
    # The machine drifts between rounds more than the engines differ, so the verdict uses
    # paired figures: each round's plait (or DDP) steps against the same round's others.
    def per_round(name):
        ts, k = result["times"][name], args.steps
        return [statistics.median(ts[r * k:(r + 1) * k]) for r in range(args.rounds)]

    one, ours, ddp = per_round("one process"), per_round("plait dp=2"), per_round("torch DDP dp=2")
    ceiling = per_round("no comm (ceiling)")

    def paired(values):
        q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return f"{statistics.median(values):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"

    print(f"\npaired per round, median over {args.rounds} rounds:")
    print(f"  plait/DDP step-time ratio    {paired([a / b for a, b in zip(ours, ddp)])}   target <= 1.00")
    print(f"  scaling efficiency, plait    {paired([a / b / 2 for a, b in zip(one, ours)])}   target >= 0.90")
    print(f"  scaling efficiency, DDP      {paired([a / b / 2 for a, b in zip(one, ddp)])}")
    print(f"  ceiling without communication {paired([a / b / 2 for a, b in zip(one, ceiling)])}")
    print(f"plait used {result['buckets']} bucket(s)")

if __name__ == "__main__":
    main()
