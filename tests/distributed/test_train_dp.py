"""`torchrun ... -m plait train --dp 2` ends where `plait train` in one process ends."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ARGS = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
        "--steps", "4", "--eval-batches", "1", "--sample-tokens", "0", "--dtype", "float64", "--no-progress"]


def test_torchrun_dp2_matches_one_process(tmp_path, data_dir):
    common = [*ARGS, "--data-dir", data_dir]
    single = subprocess.run([sys.executable, "-m", "plait", "train", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dp2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "plait", "train", *common, "--dp", "2", "--microbatches", "2",
                          "--out", str(tmp_path / "dp2")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    assert "layout: dp=2 x pp=1 on 2 process(es)" in dp2.stdout
    assert dp2.stdout.count("model: ") == 1  # one rank speaks
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "dp2" / "checkpoints" / "step-000004" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-9, worst
    assert a["0.wte.weight"].dtype == torch.float64


def test_layout_that_does_not_fill_the_job_is_refused(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *ARGS, "--dp", "2", "--data-dir", data_dir,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("plait: error: dp(2) * pp(1) = 2 != world size 1; choose --dp and --pp whose "
                           "product is 1, or start 2 processes\n")
