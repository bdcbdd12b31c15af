"""The same training run, started every way plait can be started, ends where one process ends."""

import os
import shutil
import subprocess
import sys

import torch

from tests.distributed.harness import free_port
from tests.distributed.runs import ARGS, HYBRID, assert_same_model, model_at, plait


def torchrun(nproc, args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "plait", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_plain_command_launches_its_workers(hybrid_run, single_run):
    stdout = (hybrid_run / "stdout.txt").read_text()
    assert "layout: dp=2 x pp=2 on 4 process(es)" in stdout
    assert stdout.count("model: ") == 1  # one rank speaks
    assert_same_model(model_at(single_run), model_at(hybrid_run))
    assert (hybrid_run / "sample.txt").read_text() == (single_run / "sample.txt").read_text()


def test_torchrun_interleaved_layout_matches_one_process(single_run, tmp_path, data_dir):
    out = tmp_path / "run"
    layout = ["--dp", "2", "--pp", "2", "--microbatches", "2", "--schedule", "interleaved-1f1b",
              "--virtual-stages", "2"]
    proc = torchrun(4, [*ARGS, *layout, "--data-dir", data_dir, "--out", str(out)])
    assert proc.stdout.count("model: ") == 1
    assert_same_model(model_at(single_run), model_at(out))
    assert (out / "sample.txt").read_text() == (single_run / "sample.txt").read_text()


def test_torchrun_resume_is_exact(hybrid_run, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(hybrid_run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    proc = torchrun(4, ["--resume", str(cut), "--no-progress"])
    assert f"resumed from {cut}/checkpoints/step-000004 at step 4" in proc.stdout
    a, b = model_at(hybrid_run), model_at(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_zero_run_saves_each_ranks_slice_and_one_process_resumes_from_them(single_run, tmp_path, data_dir,
                                                                             capsys):
    """`--zero 1` at dp=2 x pp=2 ends where one process ends, each dp rank writing its own slice of
    its stage's optimizer state (in the background, the default). Resumed from the slices of step 4
    by one process, whose plain AdamW puts each parameter's state together, it ends there too."""
    from plait.cli import main
    from tests.distributed.runs import ONE_PROCESS

    out = tmp_path / "zero"
    proc = plait(["train", *ARGS, *HYBRID, "--zero", "1", "--data-dir", data_dir, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000004").glob("optim-*")) == [
        "optim-pp00-dp00.pt", "optim-pp00-dp01.pt", "optim-pp01-dp00.pt", "optim-pp01-dp01.pt"]
    assert_same_model(model_at(single_run), model_at(out))
    shutil.rmtree(out / "checkpoints" / "step-000006")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *ONE_PROCESS, "--no-progress"]) == 0
    assert f"resumed from {out}/checkpoints/step-000004 at step 4" in capsys.readouterr().out
    assert_same_model(model_at(single_run), model_at(out))


def test_zbv_through_plait_train_matches_one_process_and_a_stop_resumes_exactly(single_run, tmp_path, data_dir):
    """The zero-bubble V as a user starts it: float64 parameters and sample as one process's. Then
    the same run stopped by SIGTERM to its launcher checkpoints the step every rank agreed on and,
    resumed, ends bit-identical to the uninterrupted run (the tied embedding and LM head
    are one Parameter on pp rank 0 under the V, two stages apart)."""
    from tests.distributed.test_stop import resume_and_compare, stopped_run

    out = tmp_path / "zbv"
    layout = ["--dp", "2", "--pp", "2", "--microbatches", "2", "--schedule", "zbv", "--virtual-stages", "2"]
    proc = plait(["train", *ARGS, *layout, "--data-dir", data_dir, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline: zbv, 4 stages on 2 ranks" in proc.stdout
    assert "ranks: 0: dp 0 stages 0,3; 1: dp 1 stages 0,3; 2: dp 0 stages 1,2; 3: dp 1 stages 1,2" in proc.stdout
    assert_same_model(model_at(single_run), model_at(out))
    assert (out / "sample.txt").read_text() == (single_run / "sample.txt").read_text()
    stopped, step = stopped_run(tmp_path, data_dir, layout, "term-launcher-after-step:3:rank=0", name="stopped")
    resume_and_compare(stopped, step, out)


def test_layout_that_does_not_fill_the_job_is_refused(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "plait", "train", *ARGS, "--dp", "4", "--pp", "1", "--microbatches", "1", "--data-dir", data_dir,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines == ["plait: error: dp(4) * pp(1) = 4 != world size 2; choose --dp and --pp whose "
                     "product is 2, or start 4 processes"]


def test_two_nodes_on_one_machine(single_run, tmp_path, data_dir):
    rdzv = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [sys.executable, "-m", "plait", "train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out),
            "--nnodes", "2", "--rdzv", rdzv]
    nodes = [subprocess.Popen([*args, "--node-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert sum(stdout.count("model: ") for stdout, _ in results) == 1
    assert_same_model(model_at(single_run), model_at(out))


def test_bad_data_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    proc = plait(["train", *ARGS, "--dp", "2", "--pp", "1", "--data", str(tmp_path / "missing.txt"),
                  "--out", str(tmp_path / "run")])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines == [f"plait: error: --data {tmp_path / 'missing.txt'}: no such file or folder"]


def test_verify_passes_for_zbv_with_zero1():
    """The zero-bubble V at dp=2 x pp=2 with ZeRO-1, next to one process in float64 (plait verify)."""
    proc = plait(["verify", "--dp", "2", "--pp", "2", "--microbatches", "2", "--global-batch", "8",
                  "--schedule", "zbv", "--virtual-stages", "2", "--n-layer", "2", "--zero", "1", "--bucket-mb",
                  "0.004", "--weight-decay", "0.1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plait verify: dp=2 x pp=2, zbv, 2 micro-batches, 3 steps" in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict: PASS (tolerance 1e-09)")
