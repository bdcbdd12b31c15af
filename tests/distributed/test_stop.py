"""A stop signal ends the run after a step every rank agrees on, with its checkpoint; resuming loses nothing."""

import json

import pytest
import torch

import plait
from plait import distributed
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait.report import read_metrics
from tests.distributed.harness import spawn
from tests.distributed.runs import ARGS, HYBRID, model_at, plait as run_plait

DP2 = ["--dp", "2", "--pp", "1", "--microbatches", "2"]


def agreement(asks):
    """Each rank's stop_agreed after one train_step, rank r asking with signal number asks[r] (0: none)."""
    mesh = plait.make_mesh(dp=2, pp=2)
    cfg = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)
    engine = plait.Engine(build_gpt(cfg, seed=0), gpt_loss, mesh, microbatches=2)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=torch.Generator().manual_seed(0))
    seen = [engine.stop_agreed]
    engine.stop_signal = lambda: asks[distributed.rank()]
    engine.train_step(x, torch.roll(x, -1, dims=1))
    seen.append(engine.stop_agreed)
    engine.stop_signal = lambda: 0
    engine.train_step(x, torch.roll(x, -1, dims=1))
    return seen + [engine.stop_agreed]


@pytest.mark.parametrize("asks,agreed", [([0, 0, 0, 0], [0] * 4), ([0, 0, 0, 15], [15] * 4), ([15] * 4, [15] * 4),
                                         ([10, 0, 15, 0], [10, -1, 15, -1])])
def test_every_rank_reads_the_same_stop_from_the_step_s_own_all_reduce(asks, agreed):
    """One rank asked (a signal to one worker) or all of them (through the launcher): every rank of
    the dp=2 x pp=2 job decides to stop after that step, and names the signal (its own; else the
    one rank's that was asked; -1 when several were); the next step asks nothing."""
    assert spawn(agreement, 4, asks, timeout=120) == [[0, a, 0] for a in agreed]


def stopped_run(tmp_path, data_dir, layout, fault, name="run"):
    out = tmp_path / name
    proc = run_plait(["train", *ARGS, *layout, "--data-dir", data_dir, "--out", str(out)], fault=fault)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1, proc.stdout
    step = int(lines[0].split()[3])
    assert lines[0] == (f"stopped at step {step} on SIGTERM; checkpoint {out}/checkpoints/step-{step:06d}; "
                        f"resume with: plait train --resume {out}")
    # Nothing lost: the checkpoint is of the last step the run took.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == step
    assert json.loads((out / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())["step"] == step
    assert 3 <= step < 6
    return out, step


def resume_and_compare(out, step, reference):
    proc = run_plait(["train", "--resume", str(out), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{step:06d} at step {step}" in proc.stdout
    a, b = model_at(reference), model_at(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, data_dir):
    """An uninterrupted dp=2 run, the reference of the stopped one."""
    out = tmp_path_factory.mktemp("dp2") / "run"
    proc = run_plait(["train", *ARGS, *DP2, "--data-dir", data_dir, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigterm_to_one_worker_at_dp2_checkpoints_the_step_reached_and_resumes_bit_identically(
        dp2_run, tmp_path, data_dir):
    """Rank 1 alone gets the signal; the step's all-reduce tells rank 0, which writes the line."""
    out, step = stopped_run(tmp_path, data_dir, DP2, "term-after-step:3:rank=1")
    resume_and_compare(out, step, dp2_run)


# SIGTERM to the launcher: of a dp=2 x pp=2 job (the zero-bubble V layout) in tests/distributed/
# test_train_parallel.py::test_zbv_through_plait_train_matches_one_process_and_a_stop_resumes_exactly;
# of a dp=2 job as Slurm sends it, in test_the_slurm_script_requeues_a_stopped_run_... below.


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = run_plait(["train", *ARGS, "--dp", "1", "--pp", "1", "--checkpoint-every", "0", "--data-dir", data_dir,
                      "--out", str(out)], fault="term-twice-after-step:2:rank=0")
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == "plait: stopped at once on a second SIGTERM; no checkpoint written for this stop"
    assert not (out / "checkpoints").exists()


def test_a_signal_while_the_data_is_prepared_exits_cleanly_with_nothing_half_written(tmp_path):
    """SIGTERM to the launcher as rank 0 starts preparing the data: every worker unwinds."""
    layout = DP2
    cache, out = tmp_path / "cache", tmp_path / "run"  # a cache of its own: the default corpus is prepared anew
    fault = "term-launcher-in-prepare:0:rank=0"
    proc = run_plait(["train", *ARGS, *layout, "--data-dir", str(cache), "--out", str(out)], fault=fault)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopped before the first step on SIGTERM; nothing was written" in proc.stdout.splitlines()
    assert not out.exists() or not any(out.iterdir())  # no config.toml, no checkpoint
    assert not cache.exists() or not [p for p in cache.rglob("*") if ".tmp-" in p.name]


def free_port_in(low, high):
    """A port in [low, high) nothing listens on now (the Slurm script derives its port from the job id)."""
    import random
    import socket

    for port in random.Random().sample(range(low, high), 200):
        try:
            socket.create_server(("127.0.0.1", port)).close()
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def test_the_slurm_script_requeues_a_stopped_run_and_the_requeued_job_resumes_it(dp2_run, tmp_path, data_dir):
    """`plait slurm`'s script, run by bash with srun and scontrol stood in for: the stop signal Slurm
    sends before the time limit (here: rank 0 sends it to its launcher after step 3) ends the run
    with a checkpoint and exit 3, the script requeues the job; run again as Slurm reruns a requeued
    job (same job id), it resumes the run folder and finishes bit-identical to an uninterrupted run."""
    import os
    import subprocess
    import sys

    from plait.launch import slurm_script

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nshift\nSLURM_NODEID=0 exec "$@"\n')  # one node: task 0
    (fake / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                   'elif [ "$1" = requeue ]; then echo "$2" >> "$REQUEUES"; fi\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run"
    script = slurm_script(1, 2, [*ARGS, *DP2, "--data-dir", data_dir, "--out", str(out)], python=sys.executable)
    port = free_port_in(20000, 40000)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_ID": str(port - 20000), "SLURM_NNODES": "1", "SLURM_JOB_NAME": "plait",
           "REQUEUES": str(tmp_path / "requeues")}
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                           env={**env, "PLAIT_FAULT": "term-launcher-after-step:3:rank=0"}, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = [line for line in first.stdout.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1
    step = int(stopped[0].split()[3])
    assert first.stdout.splitlines()[-1] == (f"plait: stopped before the time limit; requeueing job {port - 20000} "
                                             f"to resume {out}")
    assert (tmp_path / "requeues").read_text() == f"{port - 20000}\n"
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                           env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{step:06d} at step {step}" in again.stdout
    assert (tmp_path / "requeues").read_text() == f"{port - 20000}\n"  # finished: not requeued again
    a, b = model_at(dp2_run), model_at(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_signal_while_a_checkpoint_is_written_in_the_background_stops_after_it_with_both_in_place(tmp_path,
                                                                                                   data_dir):
    """SIGTERM from inside the background write of checkpoint 4 (one process): training went on
    beside the write, so the stop comes at a later step; its checkpoint waits for checkpoint 4 to
    be in place first, and both are complete. The run then resumes from the stop's and finishes."""
    from plait.checkpoint import newest_intact, verify_checkpoint

    out = tmp_path / "run"
    proc = run_plait(["train", *ARGS, "--dp", "1", "--pp", "1", "--steps", "12", "--data-dir", data_dir,
                      "--out", str(out)], fault="term-in-checkpoint:4:rank=0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("stopped at step")]
    step = int(line.split()[3])
    assert 4 <= step < 12
    for n in {4, step}:  # complete: the manifest and every checksum
        assert verify_checkpoint(out / "checkpoints" / f"step-{n:06d}") is None, n
    assert newest_intact(out) == out / "checkpoints" / f"step-{step:06d}"
    resumed = run_plait(["train", "--resume", str(out), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{step:06d} at step {step}" in resumed.stdout
