"""Lost workers, crashes while checkpointing, and resuming on another layout."""

import json
import re
import shutil
import statistics
import time

import pytest
import torch

from plait.checkpoint import list_checkpoints, newest_intact, verify_checkpoint
from plait.report import read_metrics
from tests.distributed.runs import ARGS, HYBRID, assert_same_model, model_at, plait


# [Note: faults and checkpoints in flight] A checkpoint written in the background (the default) is
# complete some time into the steps after it, so which one a worker killed after step N leaves
# depends on timing. The cases that kill after a step write synchronously (--no-async-checkpoint),
# so that the checkpoint they resume from is known; the background write has a case of its own.
SYNC = ["--no-async-checkpoint"]


def test_killed_workers_are_restarted_and_the_run_ends_where_it_would_have(hybrid_run, tmp_path, data_dir):
    # Round 0 loses rank 1 while it writes checkpoint 4 (that checkpoint gets no manifest, so the one
    # before it is used); round 1 loses rank 2 after step 5; round 2 finishes. No --out: the launching
    # parent names the folder once, and each restarted round finds it (a given --out reaches the
    # workers the same way: the parent passes the name it chose as --out).
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--max-restarts", "2", *SYNC],
                 fault="in-checkpoint:4:rank=1,after-step:5:rank=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    out = f"runs/{run.name}"
    resumed = [line for line in proc.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed == [f"resumed from {out}/checkpoints/step-{step:06d} at step {step}" for step in (2, 4)]
    a, b = model_at(hybrid_run), model_at(tmp_path / out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The summary is the whole run's, as if it had never stopped: read back from metrics.jsonl.
    records = read_metrics(tmp_path / out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    summary = json.loads((tmp_path / out / "summary.json").read_text())
    assert summary["val_loss"] == {"0": records[0]["val_loss"], "6": records[6]["val_loss"]}
    assert summary["median_step_time_s"] == statistics.median(r["step_time"] for r in records[1:])
    assert f"validation loss {records[0]['val_loss']:.4f} -> {records[6]['val_loss']:.4f} (step 0 -> 6)" in [
        " ".join(line.split()) for line in proc.stdout.splitlines()]


def test_without_restarts_a_killed_worker_stops_the_job_with_its_name(tmp_path, data_dir):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out), *SYNC],  # [Note: faults
                 fault="after-step:3:rank=2")                                                 # and checkpoints in flight]
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines[-1] == ("plait: error: worker rank 2 (dp=0, pp=1) was killed by SIGKILL; the other workers were "
                         "stopped; with --max-restarts N it would carry on from the newest checkpoint")
    # Workers that noticed first say what they were waiting for: a pipeline neighbour names the lost
    # rank; one that was inside a collective names the collective and its group.
    for line in lines[:-1]:
        assert re.fullmatch(r"plait: error: rank \d \(dp=\d, pp=\d\) waited \d+ s "
                            r"(to (send|receive) .+ (to|from) rank 2 \(dp=0, pp=1\)|in the .+ (over|with) .+): .+", line), line
    assert elapsed < 20 + 5 + 60  # the collective timeout, SIGKILL 5 s after SIGTERM, and the start-up
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # nothing half-written


def test_a_worker_killed_while_its_checkpoint_is_written_in_the_background_leaves_the_previous_one_newest(
        tmp_path, data_dir):
    out = tmp_path / "run"
    proc = plait(["train", *ARGS, "--dp", "2", "--pp", "1", "--microbatches", "2", "--data-dir", data_dir,
                  "--out", str(out)], fault="in-checkpoint:4:rank=0")
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")][-1] == (
        "plait: error: worker rank 0 (dp=0, pp=0) was killed by SIGKILL; the other workers were stopped; with "
        "--max-restarts N it would carry on from the newest checkpoint")
    # Rank 0 wrote its files of checkpoint 4 and died before the manifest: a folder that is never loaded.
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step-000004.tmp", "step-000002"]
    assert sorted(p.name for p in (root / ".step-000004.tmp").iterdir()) == ["model-pp00.safetensors",
                                                                            "optim-pp00.pt", "rng-pp00.pt"]
    assert newest_intact(out) == root / "step-000002" and verify_checkpoint(root / "step-000002") is None


def test_a_worker_that_stops_answering_is_reported_within_the_timeout(tmp_path, data_dir):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = plait(["train", *ARGS, *HYBRID, "--timeout", "10", "--data-dir", data_dir, "--out", str(out)],
                 fault="hang-after-step:3:rank=2")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert elapsed < 10 + 5 + 60  # the collective timeout, SIGKILL 5 s after SIGTERM, and the start-up
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    # Whoever waited on the silent rank says so, in the engine's terms (plait.watchdog, the same on
    # NCCL, where a wait does not block the host); the launcher then names the silent rank.
    waits = [line for line in lines[:-1] if "from rank 2 (dp=0, pp=1): no answer within --timeout 10 s" in line]
    assert waits and all(re.fullmatch(r"plait: error: rank \d \(dp=\d, pp=\d\) waited 10 s to receive "
                                      r"(forward activations|backward gradients) of micro-batch \d from rank 2 "
                                      r"\(dp=0, pp=1\): no answer within --timeout 10 s", line) for line in waits), lines
    assert lines[-1] == ("plait: error: worker rank 2 (dp=0, pp=1) stopped answering: its peers waited "
                         "--timeout 10 s for it; the other workers were stopped")


@pytest.mark.parametrize("layout", [["--dp", "1", "--pp", "4", "--microbatches", "4"],
                                    ["--dp", "4", "--pp", "1", "--microbatches", "2"]], ids=["dp1xpp4", "dp4xpp1"])
def test_resume_on_another_layout(hybrid_run, tmp_path, layout):
    cut = tmp_path / "cut"
    shutil.copytree(hybrid_run, cut)
    for later in list_checkpoints(cut)[1:]:  # the run stopped after step 2
        shutil.rmtree(later)
    proc = plait(["train", "--resume", str(cut), *layout])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_model(model_at(hybrid_run), model_at(cut))
