"""ZeRO-1 and ZeRO-2 (optimizer state, and gradients, sharded over dp) are exact: they end where one process on
the whole batch ends."""

import json

import pytest
import torch

import plait
from plait import distributed
from plait.checkpoint import checkpoint_group, load_checkpoint, restore_training_state, save_training_state
from plait.model import build_gpt, gpt_loss
from plait.parallel import zero as zero_module
from plait.optimizer_names import SlicedState
from plait.parallel.zero import ShardedOptimizer
from tests.distributed.harness import spawn
from tests.distributed.test_data_parallel import CFG, GLOBAL_BATCH, SMALL_BUCKETS_MB, global_batch, reference

STEPS = 3


def train_zero(microbatches, bucket_mb, clip, zero=1, native=False, overlap=False):
    mesh = plait.make_mesh(dp=distributed.world_size(), pp=1)
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    layers = [layer.double() for layer in build_gpt(CFG, seed=distributed.rank())]
    engine = plait.Engine(layers, gpt_loss, mesh, microbatches=microbatches, bucket_mb=bucket_mb)
    opt = ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, zero=zero, overlap_gather=overlap)
    sync = engine.grad_sync
    assert not sync.native_scatter  # gloo: an all-reduce, each rank keeping its slice
    sync.native_scatter = native  # NCCL's path: the reduce-scatter itself
    losses, held, in_flight = [], [], []
    for step in range(STEPS):
        in_flight.append(len(opt._in_flight))  # overlapped: the last step's gather, waited on by the forward
        x, y = global_batch(step)
        rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
        losses.append(engine.train_step(x[rows], y[rows]))
        # What gradient memory the step leaves: full buffers (ZeRO-1) or none (ZeRO-2), and no .grad.
        held.append((sum(b.flat.numel() for b in sync.buckets if b.flat is not None),
                     sum(p.grad is not None for p in engine.parameters())))
        if clip:
            engine.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    in_flight.append(len(opt._in_flight))
    full = sum(p.numel() for p in engine.parameters())
    return {"state": {k: v.clone() for k, v in engine.state_dict().items()}, "losses": losses,
            "in_flight": in_flight + [len(opt._in_flight)], "buckets": len(sync.buckets),
            "state_numel": opt.state_numel(), "full": full, "held": held,
            "shards": sum(b.shard.numel() for b in sync.buckets),
            "padded": sum(b.padded for b in sync.buckets),
            "spans": sorted({name if name.startswith("wait") else name.rsplit(" ", 2)[0]  # drop "bucket N"
                             for name, _, _ in sync.spans()}),
            "share": sum(max(0, min((dp_rank + 1) * -(-b.numel // dp), b.numel) - dp_rank * -(-b.numel // dp))
                         for b in engine.grad_sync.buckets)}  # this rank's elements of each bucket


@pytest.mark.parametrize("zero,dp,microbatches,bucket_mb,native,overlap", [
    (1, 2, 1, SMALL_BUCKETS_MB, True, False), (1, 4, 2, SMALL_BUCKETS_MB, False, False),
    (1, 2, 2, 25.0, True, False), (2, 2, 2, SMALL_BUCKETS_MB, True, False), (2, 4, 2, SMALL_BUCKETS_MB, False, False),
    (2, 2, 1, 25.0, False, False), (2, 4, 2, SMALL_BUCKETS_MB, True, False), (1, 2, 2, SMALL_BUCKETS_MB, False, True),
    (2, 2, 2, SMALL_BUCKETS_MB, True, True)])
def test_zero_equals_one_process(zero, dp, microbatches, bucket_mb, native, overlap):
    ref_state, ref_losses = reference(STEPS)
    results = spawn(train_zero, dp, microbatches, bucket_mb, 0.0, zero, native, overlap)
    for r in results:
        # Overlapped, each step's all-gather is still in flight when step() returns (every bucket),
        # until the next forward or state_dict; otherwise step() waits for it.
        after_step = r["buckets"] if overlap else 0
        assert r["in_flight"] == [0] + [after_step] * STEPS + [0]
        for name, value in ref_state.items():
            assert torch.allclose(r["state"][name], value, rtol=0, atol=1e-9), name
        assert r["losses"] == pytest.approx(ref_losses, abs=1e-9)
    for r in results[1:]:  # replicas bit-identical
        for name, value in results[0]["state"].items():
            assert torch.equal(r["state"][name], value), name


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_holds_a_dp_share_of_the_optimizer_state_and_gradients(zero):
    results = spawn(train_zero, 2, 2, SMALL_BUCKETS_MB, 0.5, zero, True)
    # AdamW keeps exp_avg and exp_avg_sq per element: twice this rank's shard of each bucket.
    total = 0
    for r in results:
        assert r["state_numel"] == 2 * r["share"]
        total += r["state_numel"]
        # The reduced gradients are this rank's half of the (padded) buckets, and nothing else:
        # ZeRO-1 keeps its full buffers between steps, ZeRO-2 none; no parameter keeps a .grad.
        assert 2 * r["shards"] == r["padded"]
        assert r["held"] == [(r["padded"] if zero == 1 else 0, 0)] * STEPS
        assert r["spans"] == ["reduce-scatter", "wait for reduce-scatter"]
    assert total == 2 * results[0]["full"]


def zero_and_plain_state(dp):
    """The gathered state of a ZeRO-1 run, a plain AdamW's on the same data, and a reload's."""
    mesh = plait.make_mesh(dp=dp, pp=1)
    dp_rank = mesh["dp"].get_local_rank()
    out = []
    for zero in (True, False):
        layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
        engine = plait.Engine(layers, gpt_loss, mesh, bucket_mb=SMALL_BUCKETS_MB)
        params = list(engine.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = (ShardedOptimizer(engine, torch.optim.AdamW, groups, lr=1e-2) if zero
               else torch.optim.AdamW(groups, lr=1e-2))
        for step in range(2):
            x, y = global_batch(step)
            rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
            engine.train_step(x[rows], y[rows])
            opt.step()
            opt.zero_grad()
        out.append(opt.state_dict())
        if zero:
            again = ShardedOptimizer(engine, torch.optim.AdamW, groups, lr=5.0)
            again.load_state_dict(out[0])
            out.append(again.state_dict())
    return out


def test_zero1_state_dict_is_the_whole_optimizers_and_reloads():
    for zero, reloaded, plain in spawn(zero_and_plain_state, 2, 2):
        for sd in (zero, reloaded):
            assert sd["param_groups"] == plain["param_groups"]
            assert sd["state"].keys() == plain["state"].keys()
            for i, s in plain["state"].items():
                assert s.keys() == sd["state"][i].keys()
                for k, v in s.items():
                    assert torch.allclose(sd["state"][i][k].to(v.device, v.dtype), v, rtol=0, atol=1e-12), (i, k)


def zero_checkpoint(run_dir, level):
    """Save a ZeRO-`level` dp=2 checkpoint; restore it into a plain optimizer, ZeRO-1 and ZeRO-2."""
    group = checkpoint_group(30.0)
    mesh = plait.make_mesh(dp=2, pp=1)
    dp_rank = mesh["dp"].get_local_rank()

    def trained(seed, zero, steps):
        engine = plait.Engine([m.double() for m in build_gpt(CFG, seed=seed)], gpt_loss, mesh,
                              bucket_mb=SMALL_BUCKETS_MB)
        opt = (ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, zero=zero) if zero
               else torch.optim.AdamW(engine.parameters(), lr=1e-2))
        for step in range(steps):
            x, y = global_batch(step + seed)
            engine.train_step(x[dp_rank * 4:(dp_rank + 1) * 4], y[dp_rank * 4:(dp_rank + 1) * 4])
            opt.step()
            opt.zero_grad()
        return engine, opt

    engine, opt = trained(0, level, 2)
    gathers = []  # [Note: ZeRO's state is saved where it is]: saving gathers nothing
    real = zero_module._all_gather
    zero_module._all_gather = lambda *args, **kwargs: gathers.append(args[1].numel()) or real(*args, **kwargs)
    try:
        path = save_training_state(run_dir, 2, engine, opt, group=group)
    finally:
        zero_module._all_gather = real
    out = {"want": opt.state_dict(), "params": {k: v.clone() for k, v in engine.state_dict().items()},
           "gathers": gathers, "state_numel": opt.state_numel() if level else None, "dp_rank": dp_rank,
           "names": [engine.tied_keys.get(n, n) for n, _ in engine.named_parameters()]}
    sliced, real_slice = [], SlicedState.slice  # a ZeRO rank copies out its own elements, whatever saved them

    def counted_slice(self, begin, end):
        state = real_slice(self, begin, end)
        sliced.append(sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0))
        return state

    SlicedState.slice = counted_slice
    try:
        for zero in (0, 1, 2):
            other = trained(7, zero, 1)
            sliced.clear()
            restore_training_state(path, *other)
            out[zero] = {"opt": other[1].state_dict(), "params": dict(other[0].state_dict()),
                         "sliced": sum(sliced), "state_numel": other[1].state_numel() if zero else None}
    finally:
        SlicedState.slice = real_slice
    return out


@pytest.mark.parametrize("level", [0, 1, 2])
def test_zero_checkpoint_resumes_with_and_without_zero(tmp_path, level):
    """Saved without ZeRO (level 0) or with it, restored with and without: the same state."""
    results = spawn(zero_checkpoint, 2, str(tmp_path), level, timeout=180)
    for r in results:
        for zero in (0, 1, 2):
            assert all(torch.equal(r[zero]["params"][k], v) for k, v in r["params"].items())
            got, want = r[zero]["opt"], r["want"]
            assert got["state"].keys() == want["state"].keys()
            for i, s in want["state"].items():
                for k, v in s.items():
                    assert torch.equal(got["state"][i][k].cpu(), v.cpu()), (zero, i, k)
        # A ZeRO rank copied out its own elements, no more, from the whole state or the slices.
        assert [r[zero]["sliced"] for zero in (1, 2)] == [r[1]["state_numel"], r[2]["state_numel"]]
    path = tmp_path / "checkpoints" / "step-000002"
    manifest = json.loads((path / "manifest.json").read_text())
    optim_files = [n for n in manifest["files"] if n.startswith("optim-")]
    if not level:
        assert optim_files == ["optim-pp00.pt"]
        return
    # Each dp rank wrote its own slice of the state, no more, and gathered nothing to do it.
    assert optim_files == ["optim-pp00-dp00.pt", "optim-pp00-dp01.pt"]
    for r in results:
        assert r["gathers"] == []
        saved = torch.load(path / optim_files[r["dp_rank"]], weights_only=True)["optimizer"]
        assert sum(v.numel() for s in saved["state"].values() for v in s.values() if v.dim() > 0) == r["state_numel"]
        assert sorted(saved["state"]) == manifest["files"][optim_files[r["dp_rank"]]]["keys"]
    # Put together, the slices are the whole optimizer's state.
    whole = load_checkpoint(path)["optimizer"]["state"]
    want, names = results[0]["want"], results[0]["names"]
    assert sorted(whole) == sorted(names[i] for i in want["state"])
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(whole[names[i]][k], v.cpu()), (names[i], k)


def built_by_train(zero):
    """train.py's optimizer (fused AdamW, decay on >= 2-d weights) for --zero, after two steps."""
    from plait.config import Config, ParallelConfig, TrainConfig
    from plait.train import build_optimizer
    mesh = plait.make_mesh(dp=2, pp=1)
    dp_rank = mesh["dp"].get_local_rank()
    engine = plait.Engine([m.double() for m in build_gpt(CFG, seed=0)], gpt_loss, mesh, bucket_mb=SMALL_BUCKETS_MB)
    cfg = Config(parallel=ParallelConfig(dp=2, pp=1, zero=zero), train=TrainConfig(lr=1e-2, weight_decay=0.1))
    opt = build_optimizer(engine, cfg)
    for step in range(2):
        x, y = global_batch(step)
        engine.train_step(x[dp_rank * 4:(dp_rank + 1) * 4], y[dp_rank * 4:(dp_rank + 1) * 4])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return type(opt).__name__, engine.grad_sync.zero, {k: v.clone() for k, v in engine.state_dict().items()}


def test_train_builds_a_sharded_optimizer_for_zero():
    plain = spawn(built_by_train, 2, 0)
    assert [name for name, _, _ in plain] == ["AdamW", "AdamW"]
    for level in (1, 2):
        zero = spawn(built_by_train, 2, level)
        assert [(name, got_level) for name, got_level, _ in zero] == [("ShardedOptimizer", level)] * 2
        for (_, _, want), (_, _, got) in zip(plain, zero):
            for k, v in want.items():
                assert torch.allclose(got[k], v, rtol=0, atol=1e-9), k


def zero_across_layouts(run_dir):
    """A ZeRO-2 dp=2 x pp=2 checkpoint (tied head cut across the stages), restored at dp=4 x pp=1
    with ZeRO-1 and without ZeRO: every rank's parameters and name-keyed optimizer state, gathered."""
    import torch.distributed as dist

    from plait.checkpoint import optimizer_state_by_name

    group = checkpoint_group(30.0)

    def gathered(engine, opt):
        mine = ({k: v.clone() for k, v in engine.state_dict().items()},
                optimizer_state_by_name(engine, opt)["state"])  # a collective under ZeRO
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        params, state = {}, {}
        for p, s in parts:
            params.update(p)
            state.update(s)
        return params, state

    def trained(mesh, zero, seed, steps, microbatches):
        dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
        engine = plait.Engine([m.double() for m in build_gpt(CFG, seed=seed)], gpt_loss, mesh,
                              microbatches=microbatches, bucket_mb=SMALL_BUCKETS_MB)
        opt = (ShardedOptimizer(engine, torch.optim.AdamW, lr=1e-2, zero=zero) if zero
               else torch.optim.AdamW(engine.parameters(), lr=1e-2))
        for step in range(steps):
            x, y = global_batch(step + seed)
            rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
            engine.train_step(x[rows], y[rows])
            engine.clip_grad_norm_(0.5)
            opt.step()
            opt.zero_grad()
        return engine, opt

    engine, opt = trained(plait.make_mesh(dp=2, pp=2), 2, 0, 2, 2)
    path = save_training_state(run_dir, 2, engine, opt, group=group)
    out = {"saved": gathered(engine, opt)}
    wide = plait.make_mesh(dp=4, pp=1)
    for zero in (0, 1):
        other = trained(wide, zero, 7, 1, 1)
        restore_training_state(path, *other)
        out[zero] = gathered(*other)
    return out


def test_a_zero2_pipeline_checkpoint_resumes_on_another_layout_with_and_without_zero(tmp_path):
    for r in spawn(zero_across_layouts, 4, str(tmp_path), timeout=180):
        params, state = r["saved"]
        assert CFG.tie_embeddings and f"{CFG.n_layer + 1}.lm_head.weight" in params  # the tie was cut
        for zero in (0, 1):
            got_params, got_state = r[zero]
            assert got_params.keys() == params.keys()
            for k, v in got_params.items():
                assert torch.equal(v, params[k]), (zero, k)
            assert got_state.keys() == state.keys()
            for name, s in state.items():
                for k, v in s.items():
                    assert torch.equal(torch.as_tensor(got_state[name][k]).cpu(), torch.as_tensor(v).cpu()), \
                        (zero, name, k)
