"""plait's pipeline schedules against torch.distributed.pipelining, side by side in one run.

    .venv/bin/python benchmarks/pipeline.py [--rounds 16] [--steps 1] [--microbatches 2,4,8]
                                            [--schedules gpipe,1f1b,zb1p,zbv,dualpipev]

The GPT of the data-parallel benchmark (about 4.8 M parameters, float32,
global batch 16 x 128 tokens), cut into 2 stages at the same place for both
engines, one thread per process. Its shape is chosen so that the stages can
be equal, as the bubble formula assumes: with a 3072-token vocabulary the
LM head costs about one block, and embedding + 3 blocks balance 2 blocks +
head. (With 4 blocks and 2048 tokens, the best cut left one stage 7-12%
heavier than the other.) For each number of micro-batches m: plait
GPipe, 1F1B, zb1p and zbv against torch's ScheduleGPipe, Schedule1F1B,
ScheduleInterleavedZeroBubble (given one stage per rank: ZB-H1's place in
torch) and ScheduleZBVZeroBubble, and one process on the whole batch; with
--schedules ...,dualpipev also plait's dualpipev against torch's
ScheduleDualPipeV (m >= 2pp only: both refuse fewer). zbv and dualpipev
cut the layers into 4 stages (by the same profile, as the Engine cuts a V:
the busiest rank balanced first), rank r holding stages r and 3-r, for both
engines. Like the data-parallel benchmark, everything is
measured in the same two processes, interleaved in rounds, medians reported;
below the table, plait/torch paired round by round, which cancels the drift.
Both engines do the same work per step: torch's runner also sums the tied
embedding / LM-head gradient over the two stages, computes the global
gradient norm (float64 per tensor, the tied copy once) and all-reduces it
with the loss in one collective, as plait's train_step does (without the
first, the two copies drift apart; the norm is what clipping and the log
take).

Columns:
- step (ms): median step time (forward, backward, a fused AdamW step as `plait train` takes).
- vs torch: plait's step time over torch's for the same schedule and m.
- efficiency: one-process step time / (2 x pipeline step time), the share of
  the two cores doing the one process's work. Small micro-batches run
  matrix products less efficiently than the whole batch does, so this is
  below 1 - bubble even with no bubble at all.
- bubble: plait's measured bubble, 1 - (time both ranks spent computing) /
  (2 x the pipeline's span), from the executor's own clock: the span runs from
  the first rank's first action to the last rank's last, as the trace's
  bubble does; the optimizer step and the loss all-reduce after it are not
  pipeline time (they cost every schedule the same; the step time has them).
- sim: the bubble plait's simulator predicts for plait's order of this
  schedule with the F, B, I and W times plait's executor measured on each
  stage in this run (medians); theory: the formula for equal stages
  (schedule.theoretical_bubble: (p-1)/(m+p-1) for 1F1B, (p-1)/(3m+p-1) for
  zb1p).
- act MiB r0/r1: peak bytes of activations held for backward on each rank,
  counted with autograd's saved-tensor hooks by storage (each storage once,
  however many views of it are saved; the weights', views included, not at
  all: F.linear saves its weight's transpose), plus for
  plait's I/W schedules what waits for W outside autograd's saved tensors:
  each deferred layer's output gradient and input (WeightGradStore.held,
  weight_grad.held_inputs; each storage once, with the saved ones), in one
  untimed step of each run: the
  hooks cost time, so timed steps run without. torch's zero-bubble split
  keeps the graph between I and W, which the hooks count.

Below the table: each (kind, stage)'s median action time; where plait's
bubble comes from (benchmarks/pipeline_idle.py: each step's own action times
replayed through its order, and whether an action runs slower while the other
rank computes); each of issue 18's targets with PASS or MISS, and for zb1p at m=4 the
shortest pipeline span any order within ZB-H1's memory could reach with the
action times measured (`span_bound`), plus the time outside the pipeline, as
a share of torch's 1F1B step: how much a better order could still win.
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
from benchmarks.pipeline_idle import format_report, idle_report  # noqa: E402
from tests.distributed.harness import spawn  # noqa: E402

import plait  # noqa: E402
from plait.model import build_gpt, count_params, gpt_loss  # noqa: E402
from plait.parallel.partition import partition  # noqa: E402
from plait.parallel.weight_grad import held_inputs  # noqa: E402
from plait.parallel.schedule import (V_SCHEDULES, make_schedule, rank_stages, schedule_layout, simulate,  # noqa: E402
                                     stage_rank, theoretical_bubble)

GLOBAL_BATCH, PP = 16, 2


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


class SavedActivations:
    """Peak bytes held by autograd for backward while active, plus what `held()` lists (the
    tensors a plait engine keeps for its W actions), read at each save.

    Counted by storage, not by tensor: a view saved for backward (a linear layer's transposed
    weight, the q, k and v slices of one projection) holds its whole storage, once however many
    views are saved. A storage of `params` is a weight, not an activation: not counted, whether
    saved as the parameter itself or as a view of it (F.linear saves the weight's transpose).
    """

    def __init__(self, params=(), held=lambda: ()):
        self.now = self.peak = 0
        self.held = held
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._live: dict[int, int] = {}  # storage address -> saved tensors on it, still alive

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size and ptr not in self._params:
            if ptr not in self._live:
                self._live[ptr] = 0
                self.now += size
            self._live[ptr] += 1
            weakref.finalize(t, self._free, ptr, size)
        self.peak = max(self.peak, self.now + self.held_bytes())
        return t

    def held_bytes(self) -> int:
        """Bytes of the tensors `held()` keeps for W outside autograd's saved tensors: each
        storage once, those counted as saved or as weights aside."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.held()}
        return sum(n for ptr, n in storages.items() if ptr not in self._live and ptr not in self._params)

    def _free(self, ptr: int, size: int):
        self._live[ptr] -= 1
        if not self._live[ptr]:
            del self._live[ptr]
            self.now -= size

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "zb1p": "ScheduleInterleavedZeroBubble",
                   "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def virtual_of(name: str) -> int:
    return 2 if name in V_SCHEDULES else 1


def runs(name: str, m: int) -> bool:
    """Whether plait runs schedule `name` with m micro-batches at pp = PP (dualpipev needs 2pp)."""
    return m >= 2 * PP or name != "dualpipev"


def make_runners(microbatches: list[int], schedules: list[str], bounds: dict[int, list[int]]) -> dict:
    """name -> (step function, its activation counter, its plait engine or None)."""
    import torch.distributed.pipelining as pipelining

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

    for m in microbatches:
        for name in (n for n in schedules if runs(n, m)):
            virtual = virtual_of(name)
            cut = bounds[virtual]
            engine = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, mesh, schedule=name, microbatches=m,
                                  virtual_stages=virtual, split=cut[1:-1])
            opt = torch.optim.AdamW(engine.parameters(), lr=1e-4, fused=True)
            store = engine.executor.weight_grads
            counter = SavedActivations(engine.parameters(), lambda store=store: [*store.held(), *held_inputs()])

            def run_plait(i, counting, engine=engine, opt=opt, counter=counter):
                with counter() if counting else contextlib.nullcontext():
                    engine.train_step(*batch(i))
                opt.step()
                opt.zero_grad(set_to_none=True)

            runners[f"plait {name} m={m}"] = (run_plait, counter, engine)
            if name == "zb1p" and m % PP:
                continue  # torch's zero-bubble schedules need a multiple of pp micro-batches

            layers = build_gpt(CFG, seed=0)
            ids = rank_stages(rank, PP, virtual, schedule_layout(name))
            modules = [nn.Sequential(*layers[cut[s]:cut[s + 1]]) for s in ids]
            stages = [pipelining.PipelineStage(mod, s, PP * virtual, torch.device("cpu")) for mod, s in zip(modules, ids)]
            cls = getattr(pipelining, TORCH_SCHEDULES[name])
            schedule = cls(stages[0] if name in ("gpipe", "1f1b") else stages, m, loss_fn=gpt_loss)
            params = list(dict.fromkeys(p for mod in modules for p in mod.parameters()))  # the tied weight once
            topt = torch.optim.AdamW(params, lr=1e-4, fused=True)
            tcounter = SavedActivations(params)
            first, last = 0 in ids, PP * virtual - 1 in ids
            # Under the loop layout the tied embedding / LM head is on both ranks: each holds a copy.
            # Under a V both stages are on rank 0, one Parameter, whose gradient autograd sums.
            tied = layers[0].wte.weight if virtual == 1 else None

            def run_torch(i, counting, schedule=schedule, opt=topt, counter=tcounter, tied=tied, first=first,
                          last=last, params=params):
                x, y = batch(i)
                kwargs = {"target": y, "losses": []} if last else {}
                with counter() if counting else contextlib.nullcontext():
                    schedule.step(x, **kwargs) if first else schedule.step(**kwargs)
                loss = (torch.stack(kwargs["losses"]).mean().detach().double() if last
                        else torch.zeros((), dtype=torch.float64))
                # What plait's train_step also does, and a torch user must add: sum the tied
                # embedding's gradient over the two stages (or the copies drift apart), and
                # give every rank the step's loss and the global gradient norm, in one collective.
                if tied is not None:
                    dist.all_reduce(tied.grad)
                norm_sq = torch.zeros((), dtype=torch.float64)
                for p in params:
                    if p.grad is not None and (first or p is not tied):  # the tied copy once
                        norm_sq += torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2
                both = torch.stack([loss, norm_sq])
                dist.all_reduce(both)
                both.tolist()
                opt.step()
                opt.zero_grad(set_to_none=True)

            runners[f"torch {name} m={m}"] = (run_torch, tcounter, None)
    return runners


def measure(rounds: int, steps: int, microbatches: list[int], schedules: list[str], bounds: dict) -> dict:
    runners = make_runners(microbatches, schedules, bounds)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    # Per timed step of a plait run, this rank's (action, start, end) from the executor's clock.
    actions: dict[str, list] = {n: [] for n in names}
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
                    actions[n].append(engine.executor.action_windows())
    return {"times": times, "actions": actions, "peak": {n: runners[n][1].peak for n in names}}


def pipeline_bubbles(res: list[dict], key: str) -> list[float]:
    """Each timed step's bubble: 1 - compute of both ranks / (2 x span from the first start to the last end)."""
    return [1 - sum(end - start for r in res for _, start, end in r["actions"][key][step]) / (PP * span)
            for step, span in enumerate(pipeline_spans(res, key))]


def pipeline_spans(res: list[dict], key: str) -> list[float]:
    """Each timed step's pipeline span in seconds: the first rank's first action to the last rank's last."""
    return [max(r["actions"][key][step][-1][2] for r in res) - min(r["actions"][key][step][0][1] for r in res)
            for step in range(len(res[0]["actions"][key]))]


def action_costs(res: list[dict], key: str) -> dict[tuple[str, int], float]:
    """The median time of each (kind, stage) over the run's timed steps, as the simulator takes them."""
    seconds: dict[tuple[str, int], list[float]] = {}
    for r in res:
        for step in r["actions"][key]:
            for action, start, end in step:
                seconds.setdefault((action.kind, action.stage), []).append(end - start)
    return {k: statistics.median(v) for k, v in seconds.items()}


def span_bound(m: int, costs: dict[tuple[str, int], float]) -> float:
    """The shortest span any order with one stage per rank (F, I, W) could reach with these action
    times, holding at most pp micro-batches on a rank (ZB-H1's and 1F1B's peak).

    Rank r cannot start before the first micro-batch's forwards on the stages before it, nor run
    its first I before that micro-batch's gradient is back (its forwards on every stage, then the
    I's of the stages after r); until then it can only run forwards, at most pp of them. After
    that, all of its own work remains: at least that long, whatever the order.
    """
    f = [costs[("F", s)] for s in range(PP)]
    # Stage 0 runs B's (zero_bubble.whole_first_stage); no I of it is waited for.
    work = [f[s] + (costs[("B", s)] if ("B", s) in costs else costs[("I", s)] + costs[("W", s)])
            for s in range(PP)]
    bound = 0.0
    for r in range(PP):
        head = sum(f[:r])
        ahead = min(m, PP) * f[r]  # forwards r can run before its first I
        back = sum(f) + sum(costs[("I", s)] for s in range(r + 1, PP))
        bound = max(bound, max(back, head + ahead) + m * work[r] - ahead)
    return bound


def simulated_bubble(name: str, m: int, costs: dict[tuple[str, int], float]) -> float:
    """plait's order of `name`, simulated with the action times plait measured on each stage."""
    virtual = virtual_of(name)
    total = PP * virtual
    split = any(kind == "I" for kind, _ in costs)
    per = {kind: [costs.get((kind, s), 0.0) for s in range(total)] for kind in "FBIW"}
    # Under I and W, stage 0 runs B's (zero_bubble.whole_first_stage): each stage what it ran.
    backward = [per["B"][s] or per["I"][s] + per["W"][s] for s in range(total)]
    return simulate(make_schedule(name, PP, m, virtual), PP, m, virtual, forward_cost=per["F"],
                    backward_cost=backward, input_cost=per["I"] if split else None,
                    weight_cost=per["W"] if split else None, layout=schedule_layout(name)).bubble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="steps of each configuration per round")
    parser.add_argument("--microbatches", default="2,4,8")
    parser.add_argument("--schedules", default="gpipe,1f1b,zb1p,zbv",
                        help="of gpipe, 1f1b, zb1p, zbv, dualpipev (dualpipev runs where m >= 2pp)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ms = [int(m) for m in args.microbatches.split(",")]
    schedules = args.schedules.split(",")
    layers = build_gpt(CFG, seed=0)
    sample = batch(0)[0][: GLOBAL_BATCH // max(ms)]
    # Balanced by measured cost: 2 stages for one per rank, 4 for a V's two per rank.
    bounds = {v: list(partition(layers, PP * v, "profile", sample_input=sample,
                                ranks=[stage_rank(s, PP, "v" if v == 2 else "loop") for s in range(PP * v)]).bounds)
              for v in (1, 2)}
    print(f"GPT {CFG.n_layer} layers x {CFG.n_embd}, vocab {CFG.vocab_size}: "
          f"{count_params(layers) / 1e6:.2f} M parameters, float32; global batch {GLOBAL_BATCH} x {CFG.block_size}; "
          f"2 stages cut at {bounds[1]}, the V's 4 at {bounds[2]}; {args.rounds} rounds x {args.steps} steps; "
          f"1 thread per process; torch {torch.__version__}")
    res = spawn(measure, PP, args.rounds, args.steps, ms, schedules, bounds, timeout=6000,
                deferred_completion=False)  # plain gloo: the wrapper is for tests
    med = {n: statistics.median(t) for n, t in res[0]["times"].items()}
    t1 = med["one process"]
    w = max(16, *(len(n) for n in med))  # the run column: "plait dualpipev m=4" is wider than the rest
    print(f"\n{'run':<{w}} {'step (ms)':>10} {'vs torch':>9} {'efficiency':>11} {'bubble':>7} {'sim':>6} "
          f"{'theory':>7} {'act MiB r0':>11} {'r1':>6}")
    print(f"{'one process':<{w}} {t1 * 1e3:>10.1f}")
    measured, simulated, peaks = {}, {}, {}
    for m in ms:
        for name in (n for n in schedules if runs(n, m)):
            for engine in ("plait", "torch"):
                key = f"{engine} {name} m={m}"
                if key not in med:
                    print(f"{key:<{w}} {'(torch needs m a multiple of pp)':>40}")
                    continue
                t = med[key]
                eff = t1 / (PP * t)
                other = f"torch {name} m={m}"
                ratio = f"{t / med[other]:>9.3f}" if engine == "plait" and other in med else f"{'':>9}"
                peaks[key] = [r["peak"][key] / 2**20 for r in res]
                bubble = sim = f"{'-':>7}"
                if engine == "plait":
                    measured[(name, m)] = statistics.median(pipeline_bubbles(res, key))
                    costs = action_costs(res, key)
                    simulated[(name, m)] = simulated_bubble(name, m, costs)
                    bubble, sim = f"{measured[(name, m)]:>7.3f}", f"{simulated[(name, m)]:>6.3f}"
                theory = theoretical_bubble(name, PP, m, virtual_of(name))
                print(f"{key:<{w}} {t * 1e3:>10.1f} {ratio} {eff:>11.3f} {bubble} {sim:>6} "
                      f"{theory:>7.3f} {peaks[key][0]:>11.1f} {peaks[key][1]:>6.1f}")

    print("\nplait's measured action times, median ms per (kind, stage), as the simulator takes them:")
    for m in ms:
        for name in (n for n in schedules if runs(n, m)):
            costs = action_costs(res, f"plait {name} m={m}")
            print(f"  {name} m={m}: " + "  ".join(f"{kind}{stage} {costs[(kind, stage)] * 1e3:.1f}"
                                                for kind, stage in sorted(costs, key=lambda k: (k[1], "FBIW".index(k[0])))))

    print("\nwhere plait's bubble comes from (benchmarks/pipeline_idle.py): each step's own action times "
          "replayed through its order, and with each rank at its usual pace (steady; pace: how far a rank's "
          "step strays from it); the share of each rank's compute the other rank computed through; each "
          "action's median time with the other rank computing through < 30 % / > 90 % of it; the spread of "
          "action times")
    for m in ms:
        for name in (n for n in schedules if runs(n, m)):
            key = f"plait {name} m={m}"
            report = idle_report([r["actions"][key] for r in res], PP, m, virtual_of(name), schedule_layout(name))
            print(format_report(f"{name} m={m}", report, measured[(name, m)], simulated[(name, m)]))

    # The machine drifts between rounds more than the engines differ: the verdict pairs each
    # round's plait steps with the same round's torch steps (see benchmarks/data_parallel.py).
    def per_round(key):
        ts, k = res[0]["times"][key], args.steps
        return [statistics.median(ts[r * k:(r + 1) * k]) for r in range(args.rounds)]

    def paired(a, b):
        ratios = [x / y for x, y in zip(per_round(a), per_round(b))]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return statistics.median(ratios), q

    print(f"\npaired per round, median (quartiles) over {args.rounds} rounds; efficiency is 1 - measured bubble:")
    worst = 0.0
    for m in ms:
        for name in (n for n in schedules if runs(n, m)):
            if f"torch {name} m={m}" not in med:
                continue
            ratio, q = paired(f"plait {name} m={m}", f"torch {name} m={m}")
            worst = max(worst, ratio)
            eff = 1 - measured[(name, m)]
            theory = theoretical_bubble(name, PP, m, virtual_of(name))
            print(f"  {name} m={m}: plait/torch {ratio:.3f} ({q[0]:.3f}-{q[2]:.3f}); efficiency {eff:.3f} = "
                  f"{eff / (1 - theory):.2f} x its bound 1 - theory, {eff / (1 - simulated[(name, m)]):.2f} x 1 - sim")
    gap = max(measured[k] - simulated[k] for k in measured)
    print(f"worst paired plait/torch step-time ratio {worst:.3f} (target <= 1.00); largest excess of plait's "
          f"measured bubble over the simulated one: {gap:.3f}")
    targets(ms, schedules, med, measured, peaks, paired)
    if {"zb1p", "1f1b"} <= set(schedules) and 4 in ms:
        # How close the order is to any order's best, with the times measured in this run.
        key = "plait zb1p m=4"
        costs = action_costs(res, key)
        span = statistics.median(pipeline_spans(res, key))
        outside = med[key] - span  # optimizer step, loss all-reduce: every schedule pays them
        bound = span_bound(4, costs)
        print(f"\nzb1p m=4: pipeline span {span * 1e3:.1f} ms, {outside * 1e3:.1f} ms outside it; no order of one "
              f"stage per rank holding at most pp micro-batches can span less than {bound * 1e3:.1f} ms with "
              f"these action times (span_bound): at best "
              f"{(bound + outside) / med['torch 1f1b m=4']:.3f} x torch Schedule1F1B's step")


def targets(ms, schedules, med, measured, peaks, paired) -> None:
    """Issue 18's targets, each PASS or MISS, from the figures above."""
    rows = []
    if {"zb1p", "1f1b"} <= set(schedules) and 4 in ms:
        ratio, _ = paired("plait zb1p m=4", "torch 1f1b m=4")
        rows.append((ratio <= 0.90, "zb1p m=4 step <= 0.90 x torch Schedule1F1B (paired)", f"{ratio:.3f}"))
    if "zbv" in schedules:
        for m in ms:
            if f"torch zbv m={m}" in med:
                ratio, _ = paired(f"plait zbv m={m}", f"torch zbv m={m}")
                rows.append((ratio <= 1.0, f"zbv m={m} step <= torch ScheduleZBVZeroBubble (paired)", f"{ratio:.3f}"))
    if {"zb1p", "1f1b"} <= set(schedules):
        for m in (m for m in ms if m in (4, 8)):
            zb, ob = measured[("zb1p", m)], measured[("1f1b", m)]
            rows.append((zb <= 0.5 * ob, f"zb1p m={m} measured bubble <= half of plait 1F1B's",
                         f"{zb:.3f} vs {ob:.3f} = {zb / ob:.2f}"))
        for m in ms:
            zb, ob = peaks[f"plait zb1p m={m}"], peaks[f"plait 1f1b m={m}"]
            per_rank = [a / b for a, b in zip(zb, ob)]
            rows.append((max(zb) <= 1.1 * max(ob), f"zb1p m={m} peak activations <= 1.1 x 1F1B's (largest rank)",
                         f"{max(zb):.1f} / {max(ob):.1f} MiB = {max(zb) / max(ob):.2f}; per rank "
                         + " / ".join(f"{x:.2f}" for x in per_rank)))
    if rows:
        print("\ntargets")
        for ok, what, figure in rows:
            print(f"  {'PASS' if ok else 'MISS'}  {what:<62} {figure}")


if __name__ == "__main__":
    main()
