"""Checkpoints across processes: each writer hashes its own files, each rank reads only its own parts,
and the checkpoint's waits keep a timeout of their own."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import plait
from plait import checkpoint, checkpoint_read
from plait.checkpoint import (checkpoint_group, latest_checkpoint, restore_training_state, save_training_state,
                              verify_checkpoint)
from plait.errors import TrainingError
from plait.model import GPTConfig, build_gpt, gpt_loss
from tests.distributed.harness import spawn

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=True)


def _trained(mesh, seed):
    """An engine of the layout `mesh` after one step from `seed`'s initialisation, and its optimizer."""
    engine = plait.Engine(build_gpt(CFG, seed=seed), gpt_loss, mesh, microbatches=2)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-2)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(seed))
    share, dp_rank = 4 // engine.dp_size, mesh["dp"].get_local_rank()  # this replica's rows of the batch of 4
    rows = slice(share * dp_rank, share * (dp_rank + 1))
    engine.train_step(x[rows], torch.roll(x, -1, dims=1)[rows])
    opt.step()
    return engine, opt


def _record_reads(into: set):
    """Note the name of every file this process hashes or loads from a checkpoint."""
    reader = checkpoint_read
    load, sha, safe_open = reader._load, reader._sha256, reader.safe_open
    reader._load = lambda path, **kw: into.add(path.name) or load(path, **kw)
    reader._sha256 = lambda path: into.add(path.name) or sha(path)
    reader.safe_open = lambda path, **kw: into.add(path.rsplit("/", 1)[-1]) or safe_open(path, **kw)


HEAD, WTE = "3.lm_head.weight", "0.wte.weight"  # CFG's tied head (layer n_layer + 1) and the embedding


def _snapshot(engine, opt):
    """Copies of an engine's parameters and its optimizer's state, both keyed by name (a tied copy's
    state by its first name)."""
    return {"state": {k: v.clone() for k, v in engine.state_dict().items()},
            "optim": {name: {k: v.clone() for k, v in s.items()}
                      for name, s in checkpoint.optimizer_state_by_name(engine, opt)["state"].items()}}


def _with_the_head_twice(path, old):
    """Copy a pp=2 checkpoint into `old` as plait wrote them before a tied weight was stored once:
    the last stage's files also hold its copy of the head and, under the embedding's name, its state."""
    shutil.copytree(path, old)
    model = load_file(old / "model-pp01.safetensors")
    model[HEAD] = safe_open_tensor(old / "model-pp00.safetensors", WTE)
    save_file(model, old / "model-pp01.safetensors")
    optim = torch.load(old / "optim-pp01.pt", weights_only=True)
    optim["optimizer"]["state"][WTE] = torch.load(old / "optim-pp00.pt", weights_only=True)["optimizer"]["state"][WTE]
    torch.save(optim, old / "optim-pp01.pt")
    manifest = json.loads((old / "manifest.json").read_text())
    for name, key in (("model-pp01.safetensors", HEAD), ("optim-pp01.pt", WTE)):
        data = (old / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                   "keys": sorted([*manifest["files"][name]["keys"], key])}
    (old / "manifest.json").write_text(json.dumps(manifest))


def safe_open_tensor(path, key):
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def save_and_restore(run_dir):
    group = checkpoint_group(30.0)
    rank = dist.get_rank()
    pp2 = plait.make_mesh(dp=1, pp=2)
    engine, opt = _trained(pp2, seed=1)
    torch.manual_seed(100 + rank)  # each rank's own CPU RNG state, to see whose comes back
    saved_rng = torch.get_rng_state()
    path = save_training_state(run_dir, 1, engine, opt, group=group)
    out = {**_snapshot(engine, opt), "saved_rng": saved_rng}

    same, reads = _trained(pp2, seed=7), set()
    _record_reads(reads)
    restore_training_state(path, *same)
    out["same"] = {"reads": sorted(reads), **_snapshot(*same), "rng": torch.get_rng_state()}

    dp2 = plait.make_mesh(dp=2, pp=1)
    other = _trained(dp2, seed=7)
    reads.clear()
    restore_training_state(path, *other)
    layers = other[0].layers
    out["other"] = {"reads": sorted(reads), **_snapshot(*other), "rng": torch.get_rng_state(),
                    "one_parameter": layers[3].lm_head.weight is layers[0].wte.weight}
    # A dp=2 layout: rank 1 is a replica and writes nothing; rank 0 has the only part.
    out["dp2_path"] = str(save_training_state(run_dir, 2, *other, group=group))
    # ... which pp=2 resumes: the last stage's head from the one stored embedding.
    back = _trained(pp2, seed=7)
    restore_training_state(out["dp2_path"], *back)
    out["back"] = _snapshot(*back)

    old = Path(run_dir) / "old"
    if rank == 0:
        _with_the_head_twice(path, old)
    dist.barrier()
    twice = _trained(pp2, seed=7)
    reads.clear()
    restore_training_state(old, *twice)
    out["old"] = {"reads": sorted(reads), **_snapshot(*twice)}
    return out


def _assert_equal(got, want):
    """Two snapshots' parameters and optimizer states, bit for bit."""
    assert got["state"].keys() == want["state"].keys()
    assert all(torch.equal(got["state"][k], v) for k, v in want["state"].items())
    assert got["optim"].keys() == want["optim"].keys()
    for name, s in want["optim"].items():
        assert s.keys() == got["optim"][name].keys()
        assert all(torch.equal(got["optim"][name][k], v) for k, v in s.items()), name


def test_each_rank_reads_only_its_parts_and_writers_hash_their_own(tmp_path):
    ranks = spawn(save_and_restore, 2, str(tmp_path), timeout=180)
    path = tmp_path / "checkpoints" / "step-000001"
    manifest = json.loads((path / "manifest.json").read_text())
    assert verify_checkpoint(path) is None
    assert list(manifest["files"]) == ["model-pp00.safetensors", "model-pp01.safetensors", "optim-pp00.pt",
                                       "optim-pp01.pt", "rng-pp00.pt", "rng-pp01.pt", "trainer.pt"]
    # The tied weight is stored once, as one process stores it: the embedding, on the first stage;
    # the last stage writes neither its copy of the head nor that copy's optimizer state.
    assert manifest["tied"] == {HEAD: WTE}
    assert HEAD in ranks[1]["state"] and torch.equal(ranks[1]["state"][HEAD], ranks[0]["state"][WTE])
    for pp, r in enumerate(ranks):
        stored = sorted(k for k in r["state"] if k != HEAD)
        assert manifest["files"][f"model-pp{pp:02d}.safetensors"]["keys"] == stored
        assert manifest["files"][f"optim-pp{pp:02d}.pt"]["keys"] == stored
        with safe_open(str(path / f"model-pp{pp:02d}.safetensors"), framework="pt") as fh:
            assert sorted(fh.keys()) == stored
    assert sorted(torch.load(path / "optim-pp01.pt", weights_only=True)["optimizer"]["state"]) == \
        manifest["files"]["optim-pp01.pt"]["keys"]
    # Same layout: pipeline rank 0 opens its own three files and trainer.pt; rank 1 also the first
    # stage's model and optimizer files, for the one stored tied weight. Each gets its own RNG back.
    assert ranks[0]["same"]["reads"] == ["model-pp00.safetensors", "optim-pp00.pt", "rng-pp00.pt", "trainer.pt"]
    assert ranks[1]["same"]["reads"] == ["model-pp00.safetensors", "model-pp01.safetensors", "optim-pp00.pt",
                                         "optim-pp01.pt", "rng-pp01.pt", "trainer.pt"]
    for r in ranks:
        _assert_equal(r["same"], r)  # the head's copy, and its optimizer state, included
        assert torch.equal(r["same"]["rng"], r["saved_rng"])
    # dp=2 x pp=1: each replica needs every key, so every part; the RNG is pipeline rank 0's.
    whole = {"state": {**ranks[0]["state"], **ranks[1]["state"]}, "optim": {**ranks[0]["optim"], **ranks[1]["optim"]}}
    for r in ranks:
        assert r["other"]["reads"] == ["model-pp00.safetensors", "model-pp01.safetensors", "optim-pp00.pt",
                                       "optim-pp01.pt", "rng-pp00.pt", "trainer.pt"]
        _assert_equal(r["other"], whole)
        assert r["other"]["one_parameter"]  # the head and the embedding are one Parameter again
        assert torch.equal(r["other"]["rng"], ranks[0]["saved_rng"])
    dp2 = json.loads((tmp_path / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert list(dp2["files"]) == ["model-pp00.safetensors", "optim-pp00.pt", "rng-pp00.pt", "trainer.pt"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-000002") is None
    # Written at pp=1, resumed at pp=2: each stage has what it saved at pp=2 (nothing trained since).
    for r in ranks:
        _assert_equal(r["back"], r)
    # An older pp=2 checkpoint that stores the head twice still loads: each stage from its own files.
    for pp, r in enumerate(ranks):
        assert r["old"]["reads"] == [f"model-pp{pp:02d}.safetensors", f"optim-pp{pp:02d}.pt", f"rng-pp{pp:02d}.pt",
                                     "trainer.pt"]
        _assert_equal(r["old"], r)
    # Read whole, either gives the head as the embedding itself, as one process's checkpoint does.
    old, new = checkpoint.load_model(tmp_path / "old"), checkpoint.load_model(path)
    assert old.keys() == new.keys() == whole["state"].keys()
    assert old[HEAD] is old[WTE] and new[HEAD] is new[WTE]
    assert all(torch.equal(old[k], v) and torch.equal(new[k], v) for k, v in whole["state"].items())


def late_rank(run_dir):
    group = checkpoint_group(2.0)  # the job's own collectives wait 60 s (spawn's collective_timeout_s)
    engine, opt = _trained(plait.make_mesh(dp=2, pp=1), seed=1)
    gave_up = Path(run_dir) / "rank-0-gave-up"
    if dist.get_rank() == 1:  # a rank still busy elsewhere, until rank 0 has stopped waiting for it
        deadline = time.monotonic() + 60
        while not gave_up.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    start = time.monotonic()
    try:
        save_training_state(run_dir, 1, engine, opt, group=group)
        return "saved", time.monotonic() - start
    except TrainingError as e:
        return str(e), time.monotonic() - start
    finally:
        if dist.get_rank() == 0:
            gave_up.touch()


def test_checkpoint_waits_time_out_on_their_own_limit(tmp_path):
    (message, waited), _ = spawn(late_rank, 2, str(tmp_path), timeout=120, collective_timeout_s=60.0)
    assert message.startswith("rank 0 gave up waiting for the other ranks while saving checkpoint 1: ")
    assert message.endswith("; if writing it takes longer, raise --checkpoint-timeout")
    assert 1.5 < waited < 6.0


def test_a_launched_pipelined_run_stores_each_weight_once(hybrid_run, single_run):
    """dp=2 x pp=2 through `plait train`: across its files, the keys one process's checkpoint holds, each once."""
    hybrid, single = (json.loads((latest_checkpoint(run) / "manifest.json").read_text())
                      for run in (hybrid_run, single_run))
    assert hybrid["layout"]["pp"] == 2
    assert hybrid["tied"] == single["tied"] == {HEAD: WTE}
    for kind, one_file in (("model-", "model-pp00.safetensors"), ("optim-", "optim-pp00.pt")):
        held = [k for name, info in hybrid["files"].items() if name.startswith(kind) for k in info["keys"]]
        assert sorted(held) == single["files"][one_file]["keys"]


V_CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=4, n_head=2, n_embd=16, tie_embeddings=True)  # 6 layers


def zbv_across_cuts(run_dir):
    """A zbv checkpoint (4 stages in a V on 2 ranks, cut one way), restored into a V cut another
    way and into 1F1B's 2 stages: each layout's parameters and optimizer state by name, all ranks'."""
    group = checkpoint_group(30.0)
    mesh = plait.make_mesh(dp=1, pp=2)

    def trained(seed, **layout):
        engine = plait.Engine(build_gpt(V_CFG, seed=seed), gpt_loss, mesh, microbatches=2, **layout)
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-2)
        x = torch.randint(0, V_CFG.vocab_size, (4, V_CFG.block_size), generator=torch.Generator().manual_seed(seed))
        engine.train_step(x, torch.roll(x, -1, dims=1))
        opt.step()
        return engine, opt

    def everyones(engine, opt):
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, _snapshot(engine, opt))
        return {kind: {k: v for part in parts for k, v in part[kind].items()} for kind in ("state", "optim")}

    saved = trained(1, schedule="zbv", virtual_stages=2, split=[1, 3, 4])
    path = save_training_state(run_dir, 1, *saved, group=group)
    out = {"saved": everyones(*saved)}
    for name, layout in (("other V", {"schedule": "zbv", "virtual_stages": 2, "split": [2, 3, 5]}),
                         ("1f1b", {"schedule": "1f1b", "split": [3]})):
        other = trained(7, **layout)
        restore_training_state(path, *other)
        out[name] = {"bounds": list(other[0].partition.bounds), **everyones(*other)}
    return out


def test_a_zbv_checkpoint_resumes_on_another_cut_and_schedule(tmp_path):
    for r in spawn(zbv_across_cuts, 2, str(tmp_path), timeout=180):
        assert "5.lm_head.weight" in r["saved"]["state"]  # V_CFG's tied head, with the embedding on rank 0
        assert r["other V"]["bounds"] == [0, 2, 3, 5, 6] and r["1f1b"]["bounds"] == [0, 3, 6]
        for name in ("other V", "1f1b"):
            _assert_equal(r[name], r["saved"])
