"""Lost workers, crashes while checkpointing, and resuming on another layout."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from plait.checkpoint import list_checkpoints, load_checkpoint

ARGS = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
        "--steps", "6", "--eval-batches", "1", "--eval-every", "0", "--sample-tokens", "0", "--dtype", "float64",
        "--no-progress", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--timeout", "20"]
HYBRID = ["--dp", "2", "--pp", "2", "--microbatches", "2"]


def plait(args, fault=None, timeout=300):
    env = {**os.environ, **({"PLAIT_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def model_at(run, step=6):
    return load_checkpoint(run / "checkpoints" / f"step-{step:06d}")["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """An uninterrupted dp=2 x pp=2 run, checkpointed every 2 steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault,resumed_at", [("after-step:3:rank=2", 2), ("in-checkpoint:4:rank=1", 2)],
                         ids=["killed after step 3", "killed while writing checkpoint 4"])
def test_killed_worker_is_restarted_and_the_run_ends_where_it_would_have(straight, tmp_path, data_dir, fault,
                                                                         resumed_at):
    out = tmp_path / "run"
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out), "--max-restarts", "1"],
                 fault=fault)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A checkpoint that was being written when the worker died has no manifest: the one before is used.
    assert f"resumed from {out}/checkpoints/step-{resumed_at:06d} at step {resumed_at}" in proc.stdout
    a, b = model_at(straight), model_at(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_without_restarts_a_killed_worker_stops_the_job_with_its_name(tmp_path, data_dir):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out)], fault="after-step:3:rank=2")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines[-1] == ("plait: error: worker rank 2 (dp=0, pp=1) was killed by SIGKILL; the other workers were "
                         "stopped; with --max-restarts N it would carry on from the newest checkpoint")
    # Neighbours that noticed first say what they were waiting for, and from whom.
    for line in lines[:-1]:
        assert " s to " in line and "rank 2 (dp=0, pp=1)" in line, line
    assert elapsed < 20 + 30 + 60  # the collective timeout, 30 s, and the start-up of 4 workers
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # nothing half-written


def test_a_worker_that_stops_answering_is_reported_within_the_timeout(tmp_path, data_dir):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = plait(["train", *ARGS, *HYBRID, "--timeout", "10", "--data-dir", data_dir, "--out", str(out)],
                 fault="hang-after-step:3:rank=2")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert elapsed < 10 + 30 + 60  # the collective timeout, 30 s, and the start-up of 4 workers
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    # Whoever waited on the silent rank says so, in the engine's terms.
    assert any(" waited 10 s to receive " in line and "from rank 2 (dp=0, pp=1)" in line for line in lines), lines


@pytest.mark.parametrize("layout", [["--dp", "1", "--pp", "4", "--microbatches", "4"],
                                    ["--dp", "4", "--pp", "1", "--microbatches", "2"]], ids=["dp1xpp4", "dp4xpp1"])
def test_resume_on_another_layout(straight, tmp_path, layout):
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for later in list_checkpoints(cut)[1:]:  # the run stopped after step 2
        shutil.rmtree(later)
    proc = plait(["train", "--resume", str(cut), *layout])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = model_at(straight), model_at(cut)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-9, worst
