"""Checkpoints across processes: each writer hashes its own files, each rank reads only its own parts,
and the checkpoint's waits keep a timeout of their own."""

import json
import time

import torch
import torch.distributed as dist

import plait
from plait import checkpoint_read
from plait.checkpoint import checkpoint_group, restore_training_state, save_training_state, verify_checkpoint
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
    reader._load = lambda path: into.add(path.name) or load(path)
    reader._sha256 = lambda path: into.add(path.name) or sha(path)
    reader.safe_open = lambda path, **kw: into.add(path.rsplit("/", 1)[-1]) or safe_open(path, **kw)


def save_and_restore(run_dir):
    group = checkpoint_group(30.0)
    rank = dist.get_rank()
    pp2 = plait.make_mesh(dp=1, pp=2)
    engine, opt = _trained(pp2, seed=1)
    torch.manual_seed(100 + rank)  # each rank's own CPU RNG state, to see whose comes back
    saved_rng = torch.get_rng_state()
    path = save_training_state(run_dir, 1, engine, opt, group=group)
    out = {"saved": {k: v.clone() for k, v in engine.state_dict().items()}, "saved_rng": saved_rng}

    same, reads = _trained(pp2, seed=7), set()
    _record_reads(reads)
    restore_training_state(path, *same)
    out["same"] = {"reads": sorted(reads), "state": same[0].state_dict(), "rng": torch.get_rng_state()}

    dp2 = plait.make_mesh(dp=2, pp=1)
    other = _trained(dp2, seed=7)
    reads.clear()
    restore_training_state(path, *other)
    out["other"] = {"reads": sorted(reads), "state": other[0].state_dict(), "rng": torch.get_rng_state()}
    # A dp=2 layout: rank 1 is a replica and writes nothing; rank 0 has the only part.
    out["dp2_path"] = str(save_training_state(run_dir, 2, *other, group=group))
    return out


def test_each_rank_reads_only_its_parts_and_writers_hash_their_own(tmp_path):
    ranks = spawn(save_and_restore, 2, str(tmp_path), timeout=180)
    path = tmp_path / "checkpoints" / "step-000001"
    manifest = json.loads((path / "manifest.json").read_text())
    assert verify_checkpoint(path) is None
    assert list(manifest["files"]) == ["model-pp00.safetensors", "model-pp01.safetensors", "optim-pp00.pt",
                                       "optim-pp01.pt", "rng-pp00.pt", "rng-pp01.pt", "trainer.pt"]
    for pp, r in enumerate(ranks):
        assert manifest["files"][f"model-pp{pp:02d}.safetensors"]["keys"] == sorted(r["saved"])
    assert "0.wte.weight" in manifest["files"]["optim-pp01.pt"]["keys"]  # the tied head's state, by its first name
    # Same layout: each pipeline rank opens its own three files and trainer.pt, and gets its own RNG back.
    for pp, r in enumerate(ranks):
        assert r["same"]["reads"] == [f"model-pp{pp:02d}.safetensors", f"optim-pp{pp:02d}.pt", f"rng-pp{pp:02d}.pt",
                                      "trainer.pt"]
        assert all(torch.equal(r["same"]["state"][k], v) for k, v in r["saved"].items())
        assert torch.equal(r["same"]["rng"], r["saved_rng"])
    # dp=2 x pp=1: each replica needs every key, so every part; the RNG is pipeline rank 0's.
    whole = {**ranks[0]["saved"], **ranks[1]["saved"]}
    for r in ranks:
        assert r["other"]["reads"] == ["model-pp00.safetensors", "model-pp01.safetensors", "optim-pp00.pt",
                                       "optim-pp01.pt", "rng-pp00.pt", "trainer.pt"]
        assert r["other"]["state"].keys() == whole.keys()
        assert all(torch.equal(r["other"]["state"][k], v) for k, v in whole.items())
        assert torch.equal(r["other"]["rng"], ranks[0]["saved_rng"])
    dp2 = json.loads((tmp_path / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert list(dp2["files"]) == ["model-pp00.safetensors", "optim-pp00.pt", "rng-pp00.pt", "trainer.pt"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-000002") is None


def late_rank(run_dir):
    group = checkpoint_group(2.0)  # the job's own collectives wait 60 s (spawn's collective_timeout_s)
    engine, opt = _trained(plait.make_mesh(dp=2, pp=1), seed=1)
    if dist.get_rank() == 1:
        time.sleep(8)  # a rank still busy elsewhere
    start = time.monotonic()
    try:
        save_training_state(run_dir, 1, engine, opt, group=group)
        return "saved", time.monotonic() - start
    except TrainingError as e:
        return str(e), time.monotonic() - start


def test_checkpoint_waits_time_out_on_their_own_limit(tmp_path):
    (message, waited), _ = spawn(late_rank, 2, str(tmp_path), timeout=120, collective_timeout_s=60.0)
    assert message.startswith("rank 0 gave up waiting for the other ranks while saving checkpoint 1: ")
    assert message.endswith("; if writing it takes longer, raise --checkpoint-timeout")
    assert 1.5 < waited < 6.0
