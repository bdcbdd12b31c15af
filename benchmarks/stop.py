"""A stop signal: steps lost, time from the signal to the exit, and what the stop agreement costs per step.

    .venv/bin/python benchmarks/stop.py [--rounds 30] [--quick]

1. `plait train` (the launcher, dp=2) is sent SIGTERM, as a scheduler would, once
   metrics.jsonl shows a chosen step: the issue's run (the default model, --steps 400
   --checkpoint-every 50, signal at step 78) and gpt2-124m (signal at step 3). Printed:
   the last step done, the checkpoint written, steps lost (done - checkpointed: 0 when the stop
   works; before plait's stop, the launcher died at once and everything since the last
   --checkpoint-every was lost), seconds from the signal to the launcher's exit, its exit code.
2. The agreement: every rank learns of a stop from one more number in the loss's all-reduce,
   which the step makes anyway ([Note: stop agreement] in plait/engine.py). A dp=2 Engine on the
   GPT of the other benchmarks steps with it on and off, interleaved round by round: median
   step times and the paired ratio; and the all-reduce alone, 2 against 3 numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stop_run(args: list[str], at_step: int, timeout: float = 1800) -> dict:
    """Start `plait train ARGS`, SIGTERM it once metrics.jsonl has step `at_step`; what happened."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.Popen([sys.executable, "-m", "plait", "train", *args, "--out", str(out), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()] \
                if metrics.is_file() else []
            if steps and max(steps) >= at_step:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended first: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=timeout)
        seconds = time.monotonic() - t0
        done = max(json.loads(line).get("step", 0) for line in metrics.read_text().splitlines())
        saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
        line = next((x for x in stdout.splitlines() if x.startswith("stopped at step")), stderr.strip()[-200:])
        return {"signalled after": at_step, "done": done, "checkpoint": saved[-1] if saved else None,
                "lost": done - (saved[-1] if saved else 0), "seconds": seconds, "code": proc.returncode,
                "line": line}


def agreement_cost(rounds: int, steps: int) -> dict:
    """In each of 2 ranks: step times with the stop agreement on and off, and the bare all-reduces."""
    import torch
    import torch.distributed as dist

    import plait
    from benchmarks.data_parallel import CFG
    from plait.model import build_gpt, gpt_loss

    mesh = plait.make_mesh(dp=2, pp=1)
    engine = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, mesh, microbatches=1)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (8, CFG.block_size), generator=g)
    y = torch.roll(x, -1, dims=1)
    times = {"off": [], "on": []}
    for r in range(rounds + 1):
        for mode in (("off", "on") if r % 2 else ("on", "off")):
            engine.stop_signal = (lambda: 0) if mode == "on" else None
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                engine.train_step(x, y)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:  # round 0 warms up
                    times[mode].append(time.perf_counter() - t0)
    bare = {}
    for n in (2, 3):
        t = torch.zeros(n, dtype=torch.float64)
        samples = []
        for _ in range(200):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        bare[n] = statistics.median(samples)
    return {"times": times, "bare": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the on/off comparison")
    parser.add_argument("--quick", action="store_true", help="the default model only, fewer rounds")
    args = parser.parse_args()
    base = ["--dp", "2", "--pp", "1", "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0"]
    runs = [("default model, --steps 400 --checkpoint-every 50", [*base, "--steps", "400", "--checkpoint-every", "50"],
             78)]
    if not args.quick:
        runs.append(("gpt2-124m seq 128 batch 4, --checkpoint-every 50",
                     [*base, "--model", "gpt2-124m", "--seq-len", "128", "--global-batch", "4", "--microbatches", "1",
                      "--steps", "400", "--checkpoint-every", "50"], 3))
    print(f"{'run':<52} {'signal after':>12} {'done':>5} {'ckpt':>5} {'lost':>5} {'signal->exit s':>15} {'code':>5}")
    for name, run_args, at in runs:
        r = stop_run(run_args, at)
        print(f"{name:<52} {r['signalled after']:>12} {r['done']:>5} {r['checkpoint']!s:>5} {r['lost']:>5} "
              f"{r['seconds']:>15.2f} {r['code']:>5}")
        print(f"  {r['line']}")

    from tests.distributed.harness import spawn

    rounds = 6 if args.quick else args.rounds
    res = spawn(agreement_cost, 2, rounds, 3, timeout=3000, deferred_completion=False)[0]
    on, off = (statistics.median(res["times"][m]) for m in ("on", "off"))
    k = 3
    paired = [statistics.median(res["times"]["on"][i * k:(i + 1) * k]) /
              statistics.median(res["times"]["off"][i * k:(i + 1) * k]) for i in range(rounds)]
    q = statistics.quantiles(paired, n=4)
    print(f"\nstop agreement, dp=2, GPT of benchmarks/data_parallel.py, global batch 8 x 128, {rounds} rounds x {k} steps:")
    print(f"  step time off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms; paired on/off {statistics.median(paired):.3f} "
          f"({q[0]:.3f}-{q[2]:.3f})")
    print(f"  the loss's all-reduce alone: 2 numbers {res['bare'][2] * 1e6:.0f} us, 3 numbers "
          f"{res['bare'][3] * 1e6:.0f} us (median of 200)")


if __name__ == "__main__":
    main()
