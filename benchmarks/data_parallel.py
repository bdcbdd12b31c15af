"""plait's data parallelism against torch's DistributedDataParallel, side by side in one run.

    .venv/bin/python benchmarks/data_parallel.py [--rounds 48] [--steps 1] [--bucket-mb 25,4]

Trains the same GPT (about 4.8 M parameters, float32) on the same global
batch, one thread per process, as: one process on the whole batch; plait
dp=2 and DDP dp=2 at each bucket size of --bucket-mb (`bucket_cap_mb` for
DDP, its defaults otherwise); and, as the ceiling that no engine can beat
here, two processes each on half the batch with no communication at all.

Two bucket sizes by default: 25 MiB is both engines' default, and with this
model's 18 MiB of gradients it leaves one large bucket that can only be sent
after backward; 4 MiB gives seven buckets, most of them sent while backward
goes on. Every contender steps a fused AdamW, as `plait train` does.

The GPT is the pipeline benchmark's: 5 blocks and a 3072-token vocabulary,
so that the LM head costs about one block and the layers cut into two equal
stages. Its whole batch runs a little slower per sequence in one process
than half of it does (a larger working set), which is why the no-communication
ceiling can exceed 1: read an engine's scaling next to that ceiling.

This machine's speed drifts by tens of percent within seconds, so all runs
are measured in the same two processes, interleaved: each round runs a step
(or --steps) of each, in rotating order, and the table reports medians over
all rounds. The one-process run goes on rank 0 while rank 1 waits at a barrier.

Columns: median step time; tokens/s; plait/DDP step-time ratio at the same
bucket size; scaling efficiency (one-process step time / dp=2 step time / 2);
and, for plait, the share of all-reduce time hidden behind backward (1 - time
waited after backward / the buckets' launch-to-completion time) and its
number of buckets. Below the table, the same ratios taken round by round, with
their median and quartiles over the rounds: the drift between rounds cancels
out of these.
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

# The GPT of every benchmark here (the pipeline and trace benchmarks import it): see the docstring.
CFG = GPTConfig(vocab_size=3072, block_size=128, n_layer=5, n_head=4, n_embd=256)
GLOBAL_BATCH = 16  # sequences per step; --global-batch changes it


def batch(step: int, rows: slice):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x[rows], torch.roll(x, -1, dims=1)[rows]


def make_runners(bucket_mbs: list[float]) -> dict:
    """name -> step(i) for each contender, all built in this process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    mesh = plait.make_mesh(dp=world)
    runners: dict = {}
    hidden: dict[str, list[float]] = {}

    single = plait.Engine(build_gpt(CFG, seed=0), gpt_loss)
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-4, fused=True)

    def run_single(i):
        if rank == 0:
            single.train_step(*batch(i, slice(None)))
            single_opt.step()
            single_opt.zero_grad(set_to_none=True)

    runners["one process"] = run_single
    for mb in bucket_mbs:
        ours = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, mesh, bucket_mb=mb)
        ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*build_gpt(CFG, seed=0)), bucket_cap_mb=mb)
        ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
        name = f"plait {mb:g} MiB"
        hidden[name] = []

        def run_plait(i, ours=ours, opt=ours_opt, hidden=hidden[name]):
            ours.train_step(*batch(i, share))
            hidden.append(ours.grad_sync.stats.hidden_fraction)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def run_ddp(i, ddp=ddp, opt=ddp_opt):
            x, y = batch(i, share)
            loss = gpt_loss(ddp(x), y)
            loss.backward()
            # plait's train_step returns the global mean loss; do the same work here.
            dist.all_reduce(loss.detach().clone())
            opt.step()
            opt.zero_grad(set_to_none=True)

        runners[name] = run_plait
        runners[f"DDP {mb:g} MiB"] = run_ddp
        hidden[f"_buckets {name}"] = len(ours.grad_sync.buckets)

    alone = plait.Engine(build_gpt(CFG, seed=0), gpt_loss)
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-4, fused=True)

    def run_alone(i):
        alone.train_step(*batch(i, share))
        alone_opt.step()
        alone_opt.zero_grad(set_to_none=True)

    runners["no comm (ceiling)"] = run_alone
    return runners, hidden


def measure(rounds: int, steps: int, bucket_mbs: list[float], global_batch: int) -> dict:
    global GLOBAL_BATCH
    GLOBAL_BATCH = global_batch  # this is a fresh process: carry the command line's choice over
    runners, hidden = make_runners(bucket_mbs)
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocator, autograd graph caches, DDP's first-iteration bucketing
        for i in range(2):
            runners[name](i)
    for values in hidden.values():
        if isinstance(values, list):
            values.clear()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                runners[name](r * steps + i)
                times[name].append(time.perf_counter() - t0)
    return {"times": times,
            "hidden": {k: statistics.median(v) if isinstance(v, list) else v for k, v in hidden.items()}}


def main() -> None:
    global GLOBAL_BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=48, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=1, help="steps of each contender per round")
    parser.add_argument("--bucket-mb", default="25,4", help="bucket sizes in MiB, each run by both engines")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH, help="sequences per step (even)")
    args = parser.parse_args()
    GLOBAL_BATCH = args.global_batch
    sizes = [float(b) for b in args.bucket_mb.split(",")]
    print(f"GPT {CFG.n_layer} layers x {CFG.n_embd}, vocab {CFG.vocab_size}: "
          f"{count_params(build_gpt(CFG, device='meta')) / 1e6:.2f} M parameters, float32; global batch "
          f"{GLOBAL_BATCH} x {CFG.block_size} tokens; {args.rounds} rounds x {args.steps} steps each; "
          f"1 thread per process; torch {torch.__version__}")
    result = spawn(measure, 2, args.rounds, args.steps, sizes, GLOBAL_BATCH, timeout=3600,
                   deferred_completion=False)[0]  # plain gloo: the wrapper is for tests
    times, hidden = result["times"], result["hidden"]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    t1 = med["one process"]
    tokens = GLOBAL_BATCH * CFG.block_size
    print(f"\n{'run (dp=2, buckets)':<20} {'step (ms)':>10} {'tokens/s':>10} {'vs DDP':>8} {'scaling':>8} "
          f"{'hidden':>8} {'buckets':>8}")
    for name, t in med.items():
        line = f"{name:<20} {t * 1e3:>10.1f} {tokens / t:>10,.0f}"
        if name != "one process":
            ddp = med[name.replace("plait", "DDP")] if name.startswith("plait") else t
            line += f" {t / ddp:>8.3f} {t1 / t / 2:>8.3f}"
            if name.startswith("plait"):
                line += f" {hidden[name]:>8.0%} {hidden[f'_buckets {name}']:>8}"
        print(line)

    # The machine drifts between rounds more than the engines differ, so the verdict uses
    # paired figures: each round's plait (or DDP) steps against the same round's others.
    def per_round(name):
        ts, k = times[name], args.steps
        return [statistics.median(ts[r * k:(r + 1) * k]) for r in range(args.rounds)]

    def paired(values):
        q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return f"{statistics.median(values):.3f} ({q[0]:.3f}-{q[2]:.3f})"

    one, ceiling = per_round("one process"), per_round("no comm (ceiling)")
    print(f"\npaired per round: median (quartiles) over {args.rounds} rounds")
    print(f"  {'buckets':>8}  {'plait/DDP step time':<22} {'scaling, plait':<22} {'scaling, DDP':<22}")
    for mb in sizes:
        ours, ddp = per_round(f"plait {mb:g} MiB"), per_round(f"DDP {mb:g} MiB")
        print(f"  {mb:>4g} MiB  {paired([a / b for a, b in zip(ours, ddp)]):<22} "
              f"{paired([a / b / 2 for a, b in zip(one, ours)]):<22} {paired([a / b / 2 for a, b in zip(one, ddp)]):<22}")
    print("  targets   <= 1.00                 >= 0.90")
    print(f"  ceiling without communication: scaling {paired([a / b / 2 for a, b in zip(one, ceiling)])}")


if __name__ == "__main__":
    main()
