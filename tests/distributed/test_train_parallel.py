"""`torchrun ... -m plait train` on any layout ends where `plait train` in one process ends."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from plait.checkpoint import load_checkpoint

ARGS = ["--dp", "1", "--pp", "1", "--microbatches", "1", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
        "--steps", "4", "--eval-batches", "1", "--sample-tokens", "4", "--dtype", "float64", "--no-progress"]


def torchrun(nproc, args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "plait", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_model(run, step=4):
    return load_checkpoint(run / "checkpoints" / f"step-{step:06d}")["model"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *ARGS, "--data-dir", data_dir, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-9, worst


@pytest.mark.parametrize("layout", [
    ["--dp", "2", "--microbatches", "2"],
    ["--pp", "2", "--microbatches", "4", "--schedule", "1f1b"],
    ["--dp", "2", "--pp", "2", "--microbatches", "2", "--schedule", "interleaved-1f1b", "--virtual-stages", "2"],
], ids=["dp2", "pp2-1f1b", "dp2xpp2-interleaved"])
def test_torchrun_layout_matches_one_process(layout, single_run, tmp_path, data_dir):
    nproc = 4 if "--dp" in layout and "--pp" in layout else 2
    out = tmp_path / "run"
    proc = torchrun(nproc, [*ARGS, *layout, "--data-dir", data_dir, "--out", str(out)])
    assert proc.stdout.count("model: ") == 1  # one rank speaks
    assert_same_model(final_model(single_run), final_model(out))
    assert (out / "sample.txt").read_text() == (single_run / "sample.txt").read_text()


def test_resume_under_a_pipeline_is_exact(tmp_path, data_dir):
    layout = ["--pp", "2", "--microbatches", "2", "--checkpoint-every", "2", "--keep-checkpoints", "5"]
    full = tmp_path / "full"
    torchrun(2, [*ARGS, *layout, "--data-dir", data_dir, "--out", str(full)])
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    proc = torchrun(2, ["--resume", str(cut), "--no-progress"])
    assert "resumed from" in proc.stdout
    a, b = final_model(full), final_model(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_layout_that_does_not_fill_the_job_is_refused(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "plait", "train", *ARGS, "--dp", "4", "--data-dir", data_dir,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines == ["plait: error: dp(4) * pp(1) = 4 != world size 2; choose --dp and --pp whose "
                     "product is 2, or start 4 processes"]


def plait(args, timeout=300):
    """`python -m plait ...` as a plain command: it starts its own workers through torch's launcher."""
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, timeout=timeout)


def test_plain_command_launches_its_workers(single_run, tmp_path, data_dir):
    out = tmp_path / "run"
    proc = plait(["train", *ARGS, "--dp", "2", "--pp", "2", "--microbatches", "2", "--data-dir", data_dir,
                  "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout: dp=2 x pp=2 on 4 process(es)" in proc.stdout
    assert_same_model(final_model(single_run), final_model(out))


def test_two_nodes_on_one_machine(single_run, tmp_path, data_dir):
    from tests.distributed.harness import free_port

    rdzv = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [sys.executable, "-m", "plait", "train", *ARGS, "--dp", "2", "--pp", "2", "--microbatches", "2",
            "--data-dir", data_dir, "--out", str(out), "--nnodes", "2", "--rdzv", rdzv]
    nodes = [subprocess.Popen([*args, "--node-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert sum(stdout.count("model: ") for stdout, _ in results) == 1
    assert_same_model(final_model(single_run), final_model(out))


def test_bad_data_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    proc = plait(["train", *ARGS, "--dp", "2", "--pp", "1", "--data", str(tmp_path / "missing.txt"),
                  "--out", str(tmp_path / "run")])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("plait: error:")]
    assert lines == [f"plait: error: --data {tmp_path / 'missing.txt'}: no such file or folder"]


def test_verify_passes_for_a_hybrid_layout():
    proc = plait(["verify", "--dp", "2", "--pp", "2", "--microbatches", "2", "--global-batch", "8",
                  "--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--n-layer", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plait verify: dp=2 x pp=2, interleaved-1f1b, 2 micro-batches, 3 steps" in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict: PASS (tolerance 1e-09)")
