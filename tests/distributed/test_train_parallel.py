"""`torchrun ... -m plait train` on any layout ends where `plait train` in one process ends."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
        "--steps", "4", "--eval-batches", "1", "--sample-tokens", "4", "--dtype", "float64", "--no-progress"]


def torchrun(nproc, args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "plait", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_model(run, step=4):
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


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
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *ARGS, "--dp", "2", "--data-dir", data_dir,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("plait: error: dp(2) * pp(1) = 2 != world size 1; choose --dp and --pp whose "
                           "product is 1, or start 2 processes\n")
