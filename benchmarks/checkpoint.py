"""How long a checkpoint stalls training: plait's synchronous write, its background write, and DCP's async_save.

    .venv/bin/python benchmarks/checkpoint.py           # gpt2-124m at dp=2 (several minutes on 2 cores)
    .venv/bin/python benchmarks/checkpoint.py --quick   # the tiny model: checks the script works

Each plait row is a real `plait train` job (`python -m plait train`, which starts its own
workers through torch's launcher), in a temporary run directory: dp=2, 8 steps, a checkpoint
every 2 steps and at the end, once with --no-async-checkpoint and once with the background
write (the default). From rank 0's metrics.jsonl: "stall" is `checkpoint_stall_s`, the
seconds the step loop spent in each checkpoint (median and max over the checkpoints in the
run, the final one included, and each in step order); "step" the median `step_time` of the
steps that did not checkpoint, after the first (`step_time` ends before a step's checkpoint;
with a checkpoint every 2 steps these are the steps that run beside a background write, which
shares the CPU with them); "wall" the whole command, start-up included.

The DCP row saves a state dict of the same tensors (the async run's last checkpoint: the
model and AdamW's state, as rank 0 writes them) with
`torch.distributed.checkpoint.async_save` in this process: its stall is the time until
async_save returns (staging to CPU memory), "write" until its Future is done. It runs once
with the default stager (made and closed by each call) and once with one DefaultStager kept
between calls, which reuses its copies as plait's writer keeps its host buffers; the median
of `--dcp-rounds` calls each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plait_run(out: Path, model: str, background: bool, data_dir: str, timeout: float) -> dict:
    """One `plait train` job; its checkpoints' stalls and step times from metrics.jsonl."""
    from plait.report import read_metrics

    flags = ["--model", model, "--dp", "2", "--pp", "1", "--seq-len", "128", "--global-batch", "4",
             "--microbatches", "1", "--steps", "8", "--checkpoint-every", "2", "--eval-every", "0",
             "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--keep-checkpoints", "2",
             "--data-dir", data_dir, "--out", str(out), "--async-checkpoint" if background else "--no-async-checkpoint"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "plait", "train", *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"plait train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [r for r in read_metrics(out / "metrics.jsonl") if "step_time" in r]
    stalls = [r["checkpoint_stall_s"] for r in records if "checkpoint_stall_s" in r]
    saved = {r["step"] for r in records if "checkpoint_stall_s" in r}
    plain = [r["step_time"] for r in records[1:] if r["step"] not in saved]
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    return {"stalls": stalls, "step": statistics.median(plain), "wall": wall, "checkpoint": ckpt, "bytes": size}


def dcp_stalls(checkpoint: Path, rounds: int, scratch: Path) -> dict:
    """async_save of the checkpoint's tensors: (stall, write) medians, default stager and a kept one."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from plait.checkpoint import load_checkpoint

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist=True says so already
    saved = load_checkpoint(checkpoint)
    state = {"model": saved["model"], "optim": saved["optimizer"]}
    out = {}
    for name, stager in (("default stager", None), ("stager kept", DefaultStager(StagingOptions(False, False, False,
                                                                                               False)))):
        stalls, writes = [], []
        for r in range(rounds):
            target = scratch / f"dcp-{name.replace(' ', '-')}-{r}"
            t0 = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=str(target), no_dist=True, async_stager=stager)
            stalls.append(time.perf_counter() - t0)
            future.result()
            writes.append(time.perf_counter() - t0)
            shutil.rmtree(target)
        if stager is not None:
            stager.close()
        out[name] = (stalls, writes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model instead of gpt2-124m")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="prepared-data cache (plait train --data-dir)")
    parser.add_argument("--dcp-rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one plait train job may take")
    args = parser.parse_args()
    model = "tiny" if args.quick else "gpt2-124m"
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="plait-ckpt-bench-"))
    try:
        rows = {}
        for label, background in (("plait, sync (--no-async-checkpoint)", False), ("plait, async (default)", True)):
            rows[label] = plait_run(scratch / ("async" if background else "sync"), model, background, args.data_dir,
                                    args.timeout)
        last = rows["plait, async (default)"]
        dcp = dcp_stalls(last["checkpoint"], args.dcp_rounds, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{model} at dp=2 x pp=1, seq 128, global batch 4, 8 steps, a checkpoint every 2 steps and at the end; "
          f"{last['bytes'] / 2**20:.0f} MiB per checkpoint; torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"\n{'':<38}{'stall med (s)':>14}{'stall max (s)':>14}{'step (s)':>10}{'wall (s)':>10}   stalls (s)")
    for label, r in rows.items():
        print(f"{label:<38}{statistics.median(r['stalls']):>14.3f}{max(r['stalls']):>14.3f}{r['step']:>10.3f}"
              f"{r['wall']:>10.1f}   {' '.join(f'{x:.2f}' for x in r['stalls'])}")
    print(f"\n{'DCP async_save, same tensors':<38}{'stall med (s)':>14}{'stall max (s)':>14}{'write med (s)':>14}")
    for name, (stalls, writes) in dcp.items():
        print(f"{'  ' + name:<38}{statistics.median(stalls):>14.3f}{max(stalls):>14.3f}"
              f"{statistics.median(writes):>14.3f}")


if __name__ == "__main__":
    main()
