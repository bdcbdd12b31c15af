"""The `plait` command as the launcher and fault tests run it: options, a runner, comparisons."""

import os
import subprocess
import sys

from plait.checkpoint import load_checkpoint

# A model small enough that a step takes milliseconds; float64 so that layouts agree to 1e-9.
ARGS = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
        "--steps", "6", "--eval-batches", "1", "--eval-every", "0", "--sample-tokens", "4", "--dtype", "float64",
        "--no-progress", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--timeout", "20"]
HYBRID = ["--dp", "2", "--pp", "2", "--microbatches", "2"]
ONE_PROCESS = ["--dp", "1", "--pp", "1", "--microbatches", "1"]


def plait(args, fault=None, timeout=300, cwd=None):
    """`python -m plait ...` as a plain command: it starts its own workers through torch's launcher."""
    env = {**os.environ, **({"PLAIT_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def model_at(run, step=6):
    return load_checkpoint(run / "checkpoints" / f"step-{step:06d}")["model"]


def assert_same_model(a, b, tolerance=1e-9):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tolerance, worst
