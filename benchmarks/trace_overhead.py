"""What recording a trace costs: the same pipeline steps with the recorder on and off, interleaved.

    .venv/bin/python benchmarks/trace_overhead.py [--rounds 30] [--steps 1]

The GPT of the other benchmarks (about 4.8 M parameters), dp=1 x pp=2, 1F1B
with 8 micro-batches (the most events per step), two processes, one thread
each. Every step is recorded while the recorder is on (the worst case: a
real run records only --trace-steps steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.data_parallel import CFG  # noqa: E402
from tests.distributed.harness import spawn  # noqa: E402

import plait  # noqa: E402
from plait.model import build_gpt, gpt_loss  # noqa: E402
from plait.trace import Recorder  # noqa: E402


def measure(rounds: int, steps: int) -> dict:
    engine = plait.Engine(build_gpt(CFG, seed=0), gpt_loss, plait.make_mesh(dp=1, pp=2), schedule="1f1b",
                          microbatches=8)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4, fused=True)
    recorder = Recorder(set(range(rounds)))
    recorder.align()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (16, CFG.block_size), generator=g)
    y = torch.roll(x, -1, dims=1)
    times = {"off": [], "on": []}
    for i in range(2):  # warm-up
        engine.train_step(x, y)
    for r in range(rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            engine.executor.recorder = recorder if mode == "on" else None
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                recorder.step = r
                engine.train_step(x, y)
                with recorder.span("optimizer", "optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                times[mode].append(time.perf_counter() - t0)
    return {"times": times, "events": len(recorder.events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    res = spawn(measure, 2, args.rounds, args.steps, timeout=1800,
                deferred_completion=False)  # plain gloo: the wrapper is for tests
    print(f"dp=1 x pp=2, 1F1B, 8 micro-batches; {args.rounds} rounds x {args.steps} steps each way; torch "
          f"{torch.__version__}")
    print(f"\n{'rank':<6}{'off (ms)':>10}{'on (ms)':>10}{'overhead':>10}{'events/step':>13}")
    for rank, r in enumerate(res):
        off, on = statistics.median(r["times"]["off"]), statistics.median(r["times"]["on"])
        per_step = r["events"] / (args.rounds * args.steps)
        print(f"{rank:<6}{off * 1e3:>10.1f}{on * 1e3:>10.1f}{on / off - 1:>10.2%}{per_step:>13.0f}")


if __name__ == "__main__":
    main()
