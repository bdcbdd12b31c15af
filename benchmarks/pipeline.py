"""plait's pipeline schedules against torch.distributed.pipelining, side by side in one run.

    .venv/bin/python benchmarks/pipeline.py [--rounds 24] [--steps 1] [--microbatches 2,4,8]

The GPT of the data-parallel benchmark (about 4.8 M parameters, float32,
global batch 16 x 128 tokens), cut into 2 stages at the same place for both
engines, one thread per process. Its shape is chosen so that the stages can
be equal, as the bubble formula assumes: with a 3072-token vocabulary the
LM head costs about one block, and embedding + 3 blocks balance 2 blocks +
head. (With 4 blocks and 2048 tokens, the best cut left one stage 7-12%
heavier than the other.) For each number of micro-batches m: plait
GPipe and 1F1B against torch's ScheduleGPipe and Schedule1F1B, and one
process on the whole batch. Like the data-parallel benchmark, everything is
measured in the same two processes, interleaved in rounds, medians reported;
below the table, plait/torch paired round by round, which cancels the drift.
Both engines do the same work per step: torch's runner also sums the tied
embedding / LM-head gradient over the two stages and all-reduces the loss,
as plait's train_step does (without the first, the two copies drift apart).

Columns:
- step (ms): median step time (forward, backward, a fused AdamW step as `plait train` takes).
- vs torch: plait's step time over torch's for the same schedule and m.
- efficiency: one-process step time / (2 x pipeline step time), the share of
  the two cores doing the one process's work. Small micro-batches run
  matrix products less efficiently than the whole batch does, so this is
  below 1 - bubble even with no bubble at all.
- bubble: plait's measured bubble, 1 - (time both ranks spent computing) /
  (2 x step time), from the executor's own clock.
- sim: the bubble plait's simulator predicts for this schedule with the
  stage costs profiled here; theory: (p-1)/(m+p-1), for equal stages.
- act MiB s0/s1: peak bytes of activations saved for backward on each stage,
  counted with autograd's saved-tensor hooks (parameters excluded) in one
  untimed step of each run: the hooks cost time, so timed steps run without.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.data_parallel import CFG  # noqa: E402
from tests.distributed.harness import spawn  # noqa: E402

import plait  # noqa: E402
from plait.model import build_gpt, count_params, gpt_loss  # noqa: E402
from plait.parallel.partition import layer_costs, partition  # noqa: E402
from plait.parallel.schedule import make_schedule, simulate, theoretical_bubble  # noqa: E402

GLOBAL_BATCH, PP = 16, 2


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


class SavedActivations:
    """Peak bytes held by autograd for backward (parameters excluded) while active."""

    def __init__(self):
        self.now = self.peak = 0
        self._live: set[int] = set()

    def _pack(self, t: torch.Tensor):
        if not isinstance(t, nn.Parameter) and id(t) not in self._live:
            size = t.untyped_storage().nbytes()
            self._live.add(id(t))
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._free, id(t), size)
        return t

    def _free(self, ident: int, size: int):
        self._live.discard(ident)
        self.now -= size

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def make_runners(microbatches: list[int], bounds: list[int]) -> dict:
    """name -> (step function, its activation counter, its plait engine or None)."""
    rank = dist.get_rank()
    mesh = plait.make_mesh(dp=1, pp=PP)
    runners = {}

    single = plait.Engine(build_gpt(CFG, seed=0), gpt_loss)
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-4, fused=True)

    def run_single(i, counting, single=single, opt=single_opt):
        if rank == 0:
            single.train_step(*batch(i))
            opt.step()
            opt.zero_grad(set_to_none=True)

    runners["one process"] = (run_single, SavedActivations(), None)
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    for m in microbatches:
        for name, torch_cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
            engine = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, mesh, schedule=name, microbatches=m,
                                  split=bounds[1:-1])
            opt = torch.optim.AdamW(engine.parameters(), lr=1e-4, fused=True)
            counter = SavedActivations()

            def run_plait(i, counting, engine=engine, opt=opt, counter=counter):
                with counter() if counting else contextlib.nullcontext():
                    engine.train_step(*batch(i))
                opt.step()
                opt.zero_grad(set_to_none=True)

            runners[f"plait {name} m={m}"] = (run_plait, counter, engine)

            layers = build_gpt(CFG, seed=0)
            module = nn.Sequential(*layers[bounds[rank]:bounds[rank + 1]])
            stage = PipelineStage(module, rank, PP, torch.device("cpu"))
            schedule = torch_cls(stage, m, loss_fn=gpt_loss)
            topt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
            tcounter = SavedActivations()

            tied = layers[0].wte.weight  # the LM head's weight too: each stage holds a copy

            def run_torch(i, counting, schedule=schedule, opt=topt, counter=tcounter, tied=tied):
                x, y = batch(i)
                with counter() if counting else contextlib.nullcontext():
                    if rank == 0:
                        schedule.step(x)
                        loss = torch.zeros((), dtype=torch.float64)
                    else:
                        losses = []
                        schedule.step(target=y, losses=losses)
                        loss = torch.stack(losses).mean().detach().double()
                # What plait's train_step also does, and a torch user must add: sum the tied
                # embedding's gradient over the two stages (or the copies drift apart), and
                # give every rank the step's loss.
                dist.all_reduce(tied.grad)
                dist.all_reduce(loss)
                loss.item()
                opt.step()
                opt.zero_grad(set_to_none=True)

            runners[f"torch {name} m={m}"] = (run_torch, tcounter, None)
    return runners


def measure(rounds: int, steps: int, microbatches: list[int], bounds: list[int]) -> dict:
    runners = make_runners(microbatches, bounds)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    busy: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up (and torch's shape inference), then one step counting activations:
        runners[n][0](0, False)  # the counting hooks cost time, so timed steps run without them
        runners[n][0](0, True)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn, _, engine = runners[n]
            for i in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                fn(1 + r * steps + i, False)
                times[n].append(time.perf_counter() - t0)
                if engine is not None:
                    busy[n].append(engine.executor.compute_s)
    return {"times": times, "busy": busy, "peak": {n: runners[n][1].peak for n in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--steps", type=int, default=1, help="steps of each configuration per round")
    parser.add_argument("--microbatches", default="2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ms = [int(m) for m in args.microbatches.split(",")]
    layers = build_gpt(CFG, seed=0)
    sample = batch(0)[0][: GLOBAL_BATCH // max(ms)]
    costs = layer_costs(layers, "profile", sample)  # seconds per layer for one micro-batch of the largest m
    bounds = list(partition(layers, PP, "profile", sample_input=sample).bounds)  # balanced by measured cost
    print(f"GPT {CFG.n_layer} layers x {CFG.n_embd}, vocab {CFG.vocab_size}: "
          f"{count_params(layers) / 1e6:.2f} M parameters, float32; global batch {GLOBAL_BATCH} x {CFG.block_size}; "
          f"2 stages cut at {bounds}; {args.rounds} rounds x {args.steps} steps; 1 thread per process; "
          f"torch {torch.__version__}")
    res = spawn(measure, PP, args.rounds, args.steps, ms, bounds, timeout=3000,
                deferred_completion=False)  # plain gloo: the wrapper is for tests
    med = {n: statistics.median(t) for n, t in res[0]["times"].items()}
    t1 = med["one process"]
    stage_cost = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(PP)]
    print(f"\n{'run':<16} {'step (ms)':>10} {'vs torch':>9} {'efficiency':>11} {'bubble':>7} {'sim':>6} "
          f"{'theory':>7} {'act MiB s0':>11} {'s1':>6}")
    print(f"{'one process':<16} {t1 * 1e3:>10.1f}")
    measured, simulated = {}, {}
    for m in ms:
        for name in ("gpipe", "1f1b"):
            for engine in ("plait", "torch"):
                key = f"{engine} {name} m={m}"
                t = med[key]
                eff = t1 / (PP * t)
                fwd = [c / 3 for c in stage_cost]  # forward about a third of forward + backward
                sim = simulate(make_schedule(name, PP, m), PP, m, forward_cost=fwd,
                               backward_cost=[2 * f for f in fwd]).bubble
                ratio = f"{t / med[f'torch {name} m={m}']:>9.3f}" if engine == "plait" else f"{'':>9}"
                acts = [r["peak"][key] / 2**20 for r in res]
                bubble = f"{'-':>7}"
                if engine == "plait":
                    busy = sum(statistics.median(r["busy"][key]) for r in res)
                    bubble = f"{1 - busy / (PP * t):>7.3f}"
                    measured[(name, m)] = 1 - busy / (PP * t)
                print(f"{key:<16} {t * 1e3:>10.1f} {ratio} {eff:>11.3f} {bubble} {sim:>6.3f} "
                      f"{theoretical_bubble(name, PP, m):>7.3f} {acts[0]:>11.1f} {acts[1]:>6.1f}")
                simulated[(name, m)] = sim
    # The machine drifts between rounds more than the engines differ: the verdict pairs each
    # round's plait steps with the same round's torch steps (see benchmarks/data_parallel.py).
    def per_round(key):
        ts, k = res[0]["times"][key], args.steps
        return [statistics.median(ts[r * k:(r + 1) * k]) for r in range(args.rounds)]

    print(f"\npaired per round, median (quartiles) over {args.rounds} rounds; efficiency is 1 - measured bubble:")
    worst = 0.0
    for m in ms:
        for name in ("gpipe", "1f1b"):
            ratios = [a / b for a, b in zip(per_round(f"plait {name} m={m}"), per_round(f"torch {name} m={m}"))]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            worst = max(worst, statistics.median(ratios))
            eff = 1 - measured[(name, m)]
            print(f"  {name} m={m}: plait/torch {statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f}); "
                  f"efficiency {eff:.3f} = {eff / (1 - theoretical_bubble(name, PP, m)):.2f} x its bound "
                  f"1 - theory, {eff / (1 - simulated[(name, m)]):.2f} x 1 - sim")
    gap = max(measured[k] - simulated[k] for k in measured)
    print(f"worst paired plait/torch step-time ratio {worst:.3f} (target <= 1.00); largest excess of plait's "
          f"measured bubble over the simulated one: {gap:.3f}")

if __name__ == "__main__":
    main()
