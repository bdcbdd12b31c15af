"""F, I, W and B of the benchmark GPT's layers, one thread: what the backward split costs.

    PYTHONPATH=src .venv/bin/python benchmarks/backward_split.py [--iters 12] [--rows 4]

The GPT of the pipeline benchmark (n_embd 256, 4 heads, 128 tokens, vocabulary 3072) at one
micro-batch of `rows` rows (4: global batch 16 in 4 micro-batches). For two blocks and for the
head (final LayerNorm and LM head), each the median of `iters` runs:
- F: the forward; B: the whole backward of a plain model (no deferral installed);
- B deferred: the backward with plait.parallel.weight_grad installed but no store deferring
  (what a B action would cost on a stage that defers);
- F, I and W native: the forward inside `deferred_forward()` (F.linear on detached weights and a
  hook; what the executor runs before an I), the backward inside `store.deferring`, then
  `store.run`; and (F+I+W)/(F+B), their sum over the plain one;
- the same three through the custom autograd function (a forward outside `deferred_forward()`),
  as (F+I+W)/(F+B) fn;
- 2 walks: torch's split for comparison, `autograd.grad` to the input (keeping the graph),
  then to the parameters;
- held: bytes the queue holds between I and W (inputs and output gradients of the linears;
  the inputs are among what the forward saved anyway), against saved: what autograd saves for
  the backward of a plain forward.
Not a test: numbers for the report and the simulator's I/W costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from plait.model import GPTConfig
from plait.model.gpt import Block, Head
from plait.parallel.weight_grad import WeightGradStore, defer_linears, deferred_forward

CFG = GPTConfig(vocab_size=3072, block_size=128, n_layer=5, n_head=4, n_embd=256)


def timed(fn, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(make, x, iters):
    """Every quantity once per round, rounds interleaved, medians: drift (other load) hits all alike."""
    torch.manual_seed(0)
    plain, deferred = make(), make()
    deferred.load_state_dict(plain.state_dict())
    defer_linears([deferred])
    store = WeightGradStore()
    kinds = ("F", "B", "B deferred", "F native", "I", "W", "F fn", "I fn", "W fn", "2 walks")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    params = [p for p in plain.parameters()]
    held = 0
    box: list = []  # the loss a timed forward makes, for the backward after it

    def forward(model):
        return model(x.detach().requires_grad_()).float().square().mean()

    def clock(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(iters + 1):  # the first round warms up and is dropped
        f = clock(lambda: forward(plain))
        loss = forward(plain)
        b = clock(loss.backward)
        loss = forward(deferred)
        bd = clock(loss.backward)
        split = {}
        ways = [("native", deferred_forward), ("fn", lambda: deferred_forward(False))]
        for way, context in ways if len(samples["F"]) % 2 else ways[::-1]:  # each goes first every other round
            with context():
                split[f"F {way}"] = clock(lambda: box.append(forward(deferred)))
            with store.deferring(0):
                split[f"I {way}"] = clock(box.pop().backward)
            held = sum(t.numel() * t.element_size() for t in store.held())
            split[f"W {way}"] = clock(lambda: store.run(0))
        # torch's split, for comparison: autograd.grad to the input keeping the graph, then to the weights.
        xx = x.detach().requires_grad_()
        loss = plain(xx).float().square().mean()
        walks = clock(lambda: (torch.autograd.grad(loss, xx, retain_graph=True), torch.autograd.grad(loss, params)))
        got = {"F": f, "B": b, "B deferred": bd, "F native": split["F native"], "I": split["I native"],
               "W": split["W native"], "F fn": split["F fn"], "I fn": split["I fn"], "W fn": split["W fn"],
               "2 walks": walks}
        for k, v in got.items():
            samples[k].append(v)
    out = {k: statistics.median(v[1:]) for k, v in samples.items()}
    out["held MiB"] = held / 2**20
    out["saved MiB"] = saved_bytes(lambda: forward(plain)) / 2**20
    return out


def saved_bytes(run) -> int:
    """Bytes autograd saves for the backward of `run()` (each storage once, parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.rows, CFG.block_size, CFG.n_embd)
    rows = {"2 blocks": lambda: nn.Sequential(Block(CFG), Block(CFG)), "head": lambda: Head(CFG)}
    print(f"one thread, activation {tuple(x.shape)}, median of {args.iters}; times in ms")
    print(f"{'layers':10} {'F':>6} {'B':>6} {'B defer':>8} {'F nat':>6} {'I':>6} {'W':>6} {'(F+I+W)/(F+B)':>14} "
          f"{'fn':>6} {'2 walks/B':>9} {'held MiB':>9} {'saved MiB':>9}")
    for name, make in rows.items():
        r = measure(make, x, args.iters)
        plain = r["F"] + r["B"]
        print(f"{name:10} {r['F']:6.1f} {r['B']:6.1f} {r['B deferred']:8.1f} {r['F native']:6.1f} {r['I']:6.1f} "
              f"{r['W']:6.1f} {(r['F native'] + r['I'] + r['W']) / plain:14.3f} "
              f"{(r['F fn'] + r['I fn'] + r['W fn']) / plain:6.3f} {r['2 walks'] / r['B']:9.2f} "
              f"{r['held MiB']:9.1f} {r['saved MiB']:9.1f}")
    # The bias gradient is deferred with its weight: its cost, a sum over the output gradient's
    # rows, is what moving it into I would add there.
    g = torch.randn(args.rows * CFG.block_size, 4 * CFG.n_embd)
    print(f"bias gradient of c_fc (sum over {g.size(0)} rows of {g.size(1)}): "
          f"{timed(lambda: g.sum(0), args.iters * 4):.3f} ms")


if __name__ == "__main__":
    main()
