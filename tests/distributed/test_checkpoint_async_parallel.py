"""Checkpoints written in the background across processes: the writer thread's waits on the checkpoint
group run beside the training thread's collectives, the files are those of the synchronous path,
and a run resumed from a checkpoint written behind its steps ends where the uninterrupted run ends."""

import json
import threading

import torch
import torch.distributed as dist

import plait
from plait import checkpoint
from plait.checkpoint import checkpoint_group, save_training_state, verify_checkpoint
from plait.checkpoint_async import CheckpointWriter
from tests.distributed.harness import spawn
from tests.distributed.test_checkpoint_parallel import CFG, _trained


def _step(engine, opt, seed):
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(seed))
    loss = engine.train_step(x, torch.roll(x, -1, dims=1))
    opt.step()
    opt.zero_grad()
    return loss


def write_beside_training(run_dir):
    group = checkpoint_group(30.0)
    rank = dist.get_rank()
    engine, opt = _trained(plait.make_mesh(dp=1, pp=2), seed=1)
    torch.manual_seed(100 + rank)
    save_training_state(f"{run_dir}/sync", 1, engine, opt, group=group)
    torch.manual_seed(100 + rank)  # the same RNG state staged
    # Rank 0's model file waits until two training steps are done: meanwhile rank 1's writer
    # thread waits for it on the checkpoint group while both training threads exchange
    # activations and all-reduce the loss on the job's group.
    release, save_file = threading.Event(), checkpoint.save_file
    checkpoint.save_file = lambda tensors, path: (rank != 0 or release.wait(30)) and save_file(tensors, path)
    writer = CheckpointWriter(group)
    writer.save(f"{run_dir}/async", 1, engine, opt)
    losses = [_step(engine, opt, seed) for seed in (2, 3)]
    busy = writer.busy
    release.set()
    writer.wait()
    return {"losses": losses, "busy": busy}


def test_a_background_write_runs_beside_the_steps_and_writes_what_the_sync_path_writes(tmp_path):
    ranks = spawn(write_beside_training, 2, str(tmp_path), timeout=120)
    assert all(r["busy"] for r in ranks)  # both writes were still in flight after the two steps
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the steps' loss all-reduce was not disturbed
    sync, done = (tmp_path / kind / "checkpoints" / "step-000001" for kind in ("sync", "async"))
    assert verify_checkpoint(done) is None
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (sync, done))
    assert list(a["files"]) == list(b["files"]) and (a["tied"], a["layout"]) == (b["tied"], b["layout"])
    assert {n: f.get("keys") for n, f in a["files"].items()} == {n: f.get("keys") for n, f in b["files"].items()}
    for pp in (0, 1):
        name = f"model-pp{pp:02d}.safetensors"
        assert (sync / name).read_bytes() == (done / name).read_bytes()
        rng = [torch.load(p / f"rng-pp{pp:02d}.pt", weights_only=True)["torch_rng"] for p in (sync, done)]
        assert torch.equal(*rng)


# Resuming from checkpoints written in the background (the default) ends bit-identical: hybrid_run's
# are, and tests/distributed/test_train_parallel.py::test_torchrun_resume_is_exact resumes from one.
