"""The host's own time in one training step: plait's Engine against a plain PyTorch loop.

    .venv/bin/python benchmarks/host_overhead.py [--layers 12] [--rounds 60]

A GPU's step is launched from the host, so what the host spends around the
kernels (walking the module tree, Python in the executor) is step time the GPU
waits for once the kernels are small. Here the same two contenders as
benchmarks/gpu.py (plait.Engine with clipping and fused AdamW; nanoGPT's loop)
train a GPT of gpt2-124m's depth made so narrow (16 wide, 8 tokens, one thread)
that its arithmetic is a small part of the step: the difference between the two
is mostly host time. Interleaved rounds, one step of each per round; the median
step and the paired ratio. ([Note: host time per step] in plait/engine.py.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (the contenders)

from plait.config import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (gpt2-124m has 12)")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gpt = ModelConfig(preset="gpt2-124m", n_layer=args.layers, n_embd=16, n_head=2, vocab_multiple=1).gpt(64)
    device = torch.device("cpu")
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    steps = {name: make(gpt, device, 1) for name, make in gpu.CONTENDERS.items()}
    for step in steps.values():
        for _ in range(5):
            step(x, y)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name](x, y)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.layers} blocks x 16 wide, 8 tokens, 1 thread, {args.rounds} rounds; torch {torch.__version__}")
    print(f"\n{'contender':<15}{'step (ms)':>11}{'vs plain':>10}")
    for name, t in med.items():
        print(f"{name:<15}{t * 1e3:>11.2f}{t / med['plain PyTorch']:>10.3f}")
    ratios = [a / b for a, b in zip(times["plait"], times["plain PyTorch"])]
    print(f"\nplait - plain: {(med['plait'] - med['plain PyTorch']) * 1e3:+.2f} ms a step; paired ratio median "
          f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
