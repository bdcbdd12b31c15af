"""Schedules with the backward split into I and W (parallel/weight_grad.py) end where one process ends.

The action lists are written here by hand (the zero-bubble schedules themselves are built in
parallel/schedule.py): each B of a 1F1B order replaced by I then W, W delayed past later F and
I actions, and B mixed with I/W. Float64, to 1e-9 against one process, as every layout is.
"""

import pytest
import torch

import plait
from plait import distributed
from plait.model import build_gpt, gpt_loss
from plait.parallel.p2p import check_plan, p2p_plan
from plait.parallel.schedule import Action
from plait.parallel.zero import ShardedOptimizer
from tests.distributed import test_hybrid, test_pipeline
from tests.distributed.harness import spawn


def acts(text):
    """Actions written stage, kind, micro-batch: "0I3"."""
    return [Action(int(t[0]), int(t[2:]), t[1]) for t in text.split()]


# pp = 2: (micro-batches, {rank: actions})
PP2 = [
    (2, {0: acts("0F0 0F1 0I0 0W0 0I1 0W1"), 1: acts("1F0 1I0 1W0 1F1 1I1 1W1")}),
    # W delayed past later F and I on the first stage, as ZB-H1 delays it.
    (4, {0: acts("0F0 0F1 0I0 0F2 0I1 0W0 0F3 0I2 0W1 0I3 0W2 0W3"),
         1: acts("1F0 1I0 1W0 1F1 1I1 1W1 1F2 1I2 1W2 1F3 1I3 1W3")}),
    # B and I/W mixed on both ranks, one W after all of its rank's I.
    (3, {0: acts("0F0 0F1 0B0 0F2 0I1 0I2 0W1 0W2"), 1: acts("1F0 1I0 1F1 1B1 1W0 1F2 1I2 1W2")}),
]


def train_pp2():
    mesh = plait.make_mesh(dp=1, pp=2)
    out = []
    for m, schedule in PP2:
        for lead in (None, 0):  # this backend's plan (gloo: receives a step early), and NCCL's
            layers = [layer.double() for layer in build_gpt(test_pipeline.CFG, seed=0)]
            engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=m)
            assert engine.split_backward
            if lead is not None:
                engine.executor.lead = lead
                plans = p2p_plan(schedule, 2, m, 1, lead)
                check_plan(schedule, plans, 2)
                engine.train_plan = plans[distributed.rank()]
            opt = test_pipeline.make_optimizer(engine.parameters())
            losses = []
            for step in range(test_pipeline.STEPS):
                losses.append(engine.train_step(*test_pipeline.global_batch(step, 2 * m)))
                opt.step()
                opt.zero_grad()
            out.append({"state": {k: v.clone() for k, v in engine.state_dict().items()}, "losses": losses})
    return out


def test_pp2_hand_made_split_schedules_equal_one_process():
    ranks = spawn(train_pp2, 2, timeout=300)
    n = 0
    for m, _ in PP2:
        ref_state, ref_losses = test_pipeline.reference(m)
        for _lead in (None, 0):
            state = {**ranks[0][n]["state"], **ranks[1][n]["state"]}
            assert state.keys() == ref_state.keys()
            for key, want in ref_state.items():
                diff = (state[key] - want).abs().max().item()
                assert diff <= 1e-9, (m, _lead, key, diff)
            for r in ranks:
                assert max(abs(a - b) for a, b in zip(r[n]["losses"], ref_losses)) <= 1e-12, (m, _lead)
            n += 1


class LaunchLog:
    """Records each bucket launch of an engine's GradientSync with the W actions run before it."""

    def __init__(self, engine):
        self.sync, self.actions = engine.grad_sync, engine.train_actions
        self.events, self.done = [], []
        store = engine.executor.weight_grads
        run, launch = store.run, self.sync._launch

        def counting_run(key):
            run(key)
            self.done.append(key)

        def recording_launch(bucket):
            self.events.append((bucket, set(self.done)))
            launch(bucket)

        store.run, self.sync._launch = counting_run, recording_launch

    def check_step(self) -> None:
        """Levels 0 and 1: each bucket once, after every W of every stage it holds. Level 2: each
        bucket once per W (or B) of each stage it holds, so once per micro-batch and stage."""
        index = {id(b): n for n, b in enumerate(self.sync.buckets)}
        stages = [self.sync._bucket_stages[index[id(b)]] for b, _ in self.events]
        if self.sync.zero < 2:
            assert sorted(index[id(b)] for b, _ in self.events) == list(range(len(self.sync.buckets)))
            for (_, done), held in zip(self.events, stages):
                assert {(a.stage, a.microbatch) for a in self.actions if a.kind == "W" and a.stage in held} <= done
        else:
            for n, bucket in enumerate(self.sync.buckets):
                want = sum(a.kind in ("B", "W") and a.stage in self.sync._bucket_stages[n] for a in self.actions)
                assert sum(b is bucket for b, _ in self.events) == want, n
        self.events.clear()
        self.done.clear()


ZERO_LEVELS = [(0, False), (1, False), (2, False), (2, True)]  # (level, NCCL's reduce-scatter path)


def train_hybrid_split(dp, pp, schedule, virtual, microbatches=2):
    """test_hybrid's run (clipping; AdamW, or ZeRO's sharded AdamW) on a split schedule, every ZeRO level."""
    mesh = plait.make_mesh(dp=dp, pp=pp)
    dp_rank = mesh["dp"].get_local_rank()
    out = []
    for zero, native in ZERO_LEVELS:
        layers = [layer.double() for layer in build_gpt(test_hybrid.CFG, seed=0)]
        engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=microbatches,
                              virtual_stages=virtual, bucket_mb=0.004)
        if zero:
            opt = ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, zero=zero)
            engine.grad_sync.native_scatter = native
        else:
            opt = torch.optim.AdamW(engine.parameters(), lr=1e-2, weight_decay=0.1)
        if isinstance(schedule, str):  # zb1p, zbv, dualpipev: stage 0 runs whole B's, so only later stages defer
            for stage, module in engine.executor.stages.items():
                deferred = any(m.__dict__.get("_plait_deferred") for m in module.modules())
                assert deferred == (stage != 0), (schedule, stage)
        log = LaunchLog(engine)
        norms = []
        for step in range(test_hybrid.STEPS):
            x, y = test_hybrid.global_batch(step)
            rows = slice(dp_rank * test_hybrid.GLOBAL_BATCH // dp, (dp_rank + 1) * test_hybrid.GLOBAL_BATCH // dp)
            engine.train_step(x[rows], y[rows])
            log.check_step()
            norms.append(engine.clip_grad_norm_(test_hybrid.CLIP))
            opt.step()
            opt.zero_grad()
        out.append({"state": {k: v.clone() for k, v in engine.state_dict().items()}, "norms": norms})
    return out


def assert_hybrid_equals_one_process(ranks):
    ref_state, ref_norms = test_hybrid.reference()
    for n, level in enumerate(ZERO_LEVELS):
        state = {}
        for r in ranks:
            for key, value in r[n]["state"].items():
                if key in state:  # replicas, and the tied copies, are bit-identical
                    assert torch.equal(state[key], value), (level, key)
                state[key] = value
        assert state.keys() == ref_state.keys()
        for key, want in ref_state.items():
            diff = (state[key] - want).abs().max().item()
            assert diff <= 1e-9, (level, key, diff)
        for r in ranks:
            assert max(abs(a - b) for a, b in zip(r[n]["norms"], ref_norms)) <= 1e-9, level


# dp = 2 x pp = 2, 2 micro-batches per replica (dualpipev: 4, its least): zb1p cuts GPT-2's tied
# embedding across the two ranks; zbv's and dualpipev's V put the embedding and the LM head both on pp
# rank 0, one Parameter in two stages. dualpipev runs B's and split backwards on one stage.
@pytest.mark.parametrize("schedule,virtual,m", [("zb1p", 1, 2), ("zbv", 2, 2), ("dualpipev", 2, 4)])
def test_dp2_pp2_zero_bubble_with_tied_embeddings_clipping_and_zero_equals_one_process(schedule, virtual, m):
    assert_hybrid_equals_one_process(spawn(train_hybrid_split, 4, 2, 2, schedule, virtual, m, timeout=400))


# dp = 2, two stages on each rank as a V layout's first rank holds them: the tied embedding and
# LM head one Parameter in both stages, its reduction waiting for both.
TWO_STAGES = {0: [Action(int(s), int(i), k) for s, k, i in (t.split(":") for t in (
    "0:F:0 1:F:0 0:F:1 1:F:1 1:I:0 0:I:0 1:B:1 0:I:1 1:W:0 0:W:0 0:W:1").split())]}


def test_dp2_two_stages_on_one_rank_split_schedule_equals_one_process():
    assert_hybrid_equals_one_process(spawn(train_hybrid_split, 2, 2, 1, TWO_STAGES, 2, timeout=400))


def explicit_sync_one_rank():
    """A GradientSync on a group of one under each ZeRO level, fed by an Engine holding two stages
    (the tied weight in both); returns, per schedule and level, the reduced gradients by name and
    (levels 0 and 1) whether each bucket sent exactly once what it ended with."""
    import torch.distributed as dist

    from plait.engine import Engine
    from plait.parallel.data_parallel import GradientSync
    from tests.parallel.test_weight_grad import CFG, tokens, vacts

    dist.init_process_group("gloo", rank=0, world_size=1)  # plait.init makes no group for one process
    x, y = tokens(rows=8)
    out = []
    for line in TWO_STAGE_LINES:
        for level in (0, 1, 2):
            engine = Engine([layer.double() for layer in build_gpt(CFG, seed=0)], gpt_loss,
                            schedule={0: vacts(line)}, microbatches=2, virtual_stages=2)
            users = {}
            for s, stage in engine.executor.stages.items():
                for p in stage.parameters():
                    users.setdefault(p, set()).add(s)
            sync = GradientSync(list(engine.parameters()), dist.group.WORLD, bucket_bytes=4096,
                                keys={p: (min(s), -1) for p, s in users.items()}, stages=users)
            sync.set_zero(level)
            engine.grad_sync, engine.executor.weight_grads.accumulate = sync, sync.add_grad
            sent, launch, in_w, run = [], sync._launch, [False], engine.executor.weight_grads.run

            def recording_launch(bucket, launch=launch, sent=sent, in_w=in_w):
                sent.append((bucket, bucket.flat[:bucket.numel].clone() if bucket.flat is not None else None, in_w[0]))
                launch(bucket)

            def flagged_run(key, run=run, in_w=in_w):
                in_w[0] = True
                run(key)
                in_w[0] = False

            sync._launch, engine.executor.weight_grads.run = recording_launch, flagged_run
            engine.train_step(x, y)
            names = {p: n for n, p in engine.named_parameters()}
            grads, once = {}, True
            for bucket in sync.buckets:
                full = bucket.flat[:bucket.numel] if level == 0 else bucket.shard[:bucket.numel]
                offset = 0
                for p in bucket.params:
                    grads[names[p]] = full[offset:offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
                mine = [s for b, s, _ in sent if b is bucket]
                if level < 2:  # one launch, after which nothing was added (a group of one sums nothing)
                    once = once and len(mine) == 1 and torch.equal(mine[0], full)
            # Level 2: every bucket after each W or B of each stage using one of its parameters.
            per_micro_batch = sum(a.kind in ("B", "W") and any(a.stage in users[p] for p in b.params)
                                  for b in sync.buckets for a in engine.train_actions)
            out.append({"grads": grads, "sent once": once, "launches": len(sent), "buckets": len(sync.buckets),
                        "level 2 launches": per_micro_batch, "during W": sum(w for _, _, w in sent)})
    return out


TWO_STAGE_LINES = ["0:F:0 1:F:0 0:F:1 1:F:1 1:I:0 0:I:0 1:I:1 0:I:1 1:W:1 0:W:0 1:W:0 0:W:1",
                   "0:F:0 1:F:0 1:B:0 0:I:0 0:F:1 1:F:1 1:I:1 0:B:1 1:W:1 0:W:0"]


def test_explicit_sync_sends_each_bucket_once_after_its_stages_last_w_with_its_final_gradient():
    from tests.parallel.test_weight_grad import gpt, tokens

    x, y = tokens(rows=8)
    ref = gpt(torch.float64, defer=False)
    gpt_loss(ref(x), y).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    results = spawn(explicit_sync_one_rank, 1, timeout=120)[0]
    for n, r in enumerate(results):
        level = n % 3
        assert r["grads"].keys() == want.keys()
        for name, g in r["grads"].items():
            assert (g - want[name]).abs().max().item() <= 1e-15, (n, name)
        if level < 2:
            assert r["sent once"] and r["launches"] == r["buckets"] and r["during W"] == 0, n
        else:  # streamed: most buckets leave during W, as soon as their W gradients are in
            assert r["launches"] == r["level 2 launches"] > 2 * r["buckets"], n
            assert r["during W"] >= r["launches"] // 3, (n, r["during W"], r["launches"])
