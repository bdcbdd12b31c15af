"""Cutting the ordered layer list into contiguous pipeline stages.

A pipeline runs no faster than its slowest stage, so the cut minimises the
largest stage cost; where a rank holds several stages (interleaved 1F1B, zbv's
V), no faster than its busiest rank, so the cut minimises the largest rank's
load first. What a layer "costs" is a choice (`METHODS`): one unit per layer,
its number of parameters, or its measured forward + backward time. `--split`
bypasses the search and cuts where the user says.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from plait.errors import ConfigError

METHODS = ("uniform", "params", "profile")


def _check_stage_count(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ConfigError(
            f"cannot cut {num_layers} layers into {num_stages} stages; "
            "lower --pp (or --virtual-stages) or raise --n-layer"
        )


def balanced_cuts(costs: Sequence[float], num_stages: int, ranks: Sequence[int] | None = None) -> list[int]:
    """Boundaries `[0, c1, ..., len(costs)]` of the contiguous split into `num_stages`
    non-empty stages whose largest stage cost is the smallest possible (exact).

    `ranks[s]` is the rank holding stage s (`schedule.stage_rank`). Where a rank
    holds several stages, the cut minimises the largest rank load (the sum of the
    rank's stage costs) among the cuts whose largest stage costs at most
    1 + STAGE_SLACK times the smallest possible, then the largest stage cost, then
    as below (`_rank_balanced`). Cut for its stages alone, zbv's V can leave one
    rank with twice the other's work: on the benchmark GPT (embedding, 5 blocks,
    head) the stages embedding | 2 blocks | 2 blocks | block + head are as even as
    stages get, and put 2 blocks on rank 0 against 4 on rank 1.

    Ties: among the optimal splits, the one whose stage costs, read from the
    first stage on, are lexicographically smallest; then the one with the
    earliest cuts. That leaves early stages light, which suits 1F1B schedules,
    where the first stages hold the most micro-batches of activations.
    Stage costs are `math.fsum`s, correctly rounded, so comparisons do not
    depend on summation order. O(num_stages * n^2) time; n is at most a few
    hundred layers.
    """
    costs = [float(c) for c in costs]
    n, k = len(costs), num_stages
    _check_stage_count(n, k)
    if any(not c >= 0 for c in costs):  # also rejects NaN
        raise ValueError(f"layer costs must be non-negative numbers, got {costs}")
    seg = [[math.fsum(costs[a:b]) for b in range(n + 1)] for a in range(n + 1)]
    # best[j][a]: the least possible largest cost of layers a.. cut into j stages.
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    for a in range(n):
        best[1][a] = seg[a][n]
    for j in range(2, k + 1):
        for a in range(n - j + 1):
            best[j][a] = min(max(seg[a][b], best[j - 1][b]) for b in range(a + 1, n - j + 2))
    top = best[k][0]
    # Earliest feasible cut at each step gives the lexicographically smallest
    # costs: a later cut with the same cost only skips zero-cost layers, and
    # every continuation open to it is open to the earlier cut too.
    bounds, a = [0], 0
    for j in range(k, 1, -1):
        a = next(b for b in range(a + 1, n - j + 2) if seg[a][b] <= top and best[j - 1][b] <= top)
        bounds.append(a)
    bounds.append(n)
    if ranks is not None:
        if len(ranks) != k:
            raise ValueError(f"{len(ranks)} ranks for {k} stages")
        if len(set(ranks)) < k:
            return _rank_balanced(seg, k, list(ranks), bounds, top * (1 + STAGE_SLACK))
    return bounds


# How much larger than the smallest possible a stage may grow to even out the ranks: a stage's
# cost sets the pipeline's fill and drain, a rank's load its steady state, and profiled costs
# vary by a few percent from run to run.
STAGE_SLACK = 0.1
# The most partial cuts `_rank_balanced` visits before it settles for the best found so far:
# every cut of a GPT-2-sized layer list (14 layers) into 8 stages takes far fewer.
SEARCH_BUDGET = 200_000


def _rank_balanced(seg: list[list[float]], k: int, ranks: list[int], start: list[int], limit: float) -> list[int]:
    """The cut into k stages (stage s on rank ranks[s]), each costing at most `limit`, whose
    largest rank load is the smallest; ties: the smaller largest stage cost, the
    lexicographically smaller stage costs, the earlier cuts. Depth-first over the cuts, pruned
    where a stage passes `limit` or a rank's load passes the best found (costs are non-negative:
    a later cut only adds). Exact within SEARCH_BUDGET partial cuts, else the best found, never
    worse than `start` (the per-stage optimum).
    """
    n = len(seg) - 1
    held: list[list[float]] = [[] for _ in range(max(ranks) + 1)]

    def key(bounds):
        stage = tuple(seg[a][b] for a, b in zip(bounds, bounds[1:]))
        loads = [math.fsum(c for c, r in zip(stage, ranks) if r == q) for q in range(len(held))]
        return max(loads), max(stage), stage, tuple(bounds)

    best = key(start)
    visits = 0

    def search(j: int, a: int, bounds: list[int]) -> None:
        nonlocal best, visits
        visits += 1
        if visits > SEARCH_BUDGET:
            return
        last = j == k - 1
        for b in ([n] if last else range(a + 1, n - (k - j - 1) + 1)):
            mine = held[ranks[j]]
            mine.append(seg[a][b])
            over = seg[a][b] > limit or math.fsum(mine) > best[0]
            if not over:
                if last:
                    best = min(best, key(bounds + [b]))
                else:
                    search(j + 1, b, bounds + [b])
            mine.pop()
            if over:
                break

    search(0, 0, [0])
    return list(best[3])


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"--partition {method}: unknown method; choose one of {', '.join(METHODS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


def _profile(layers: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    seconds = []
    # Dropout draws random numbers; profiling must not shift the training run's stream.
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), torch.enable_grad():
        for layer in layers:
            inp = x.detach()
            if inp.is_floating_point():
                inp.requires_grad_(True)
            wrt = [t for t in (inp, *layer.parameters()) if t.requires_grad]
            runs = []
            for _ in range(repeats + 1):
                _sync(inp.device)
                start = time.perf_counter()
                out = layer(inp)
                if wrt and out.requires_grad:
                    # autograd.grad does the work of backward without touching any .grad.
                    torch.autograd.grad(out, wrt, torch.ones_like(out))
                _sync(inp.device)
                runs.append(time.perf_counter() - start)
            seconds.append(statistics.median(runs[1:]))  # runs[0] is the warm-up
            x = out.detach()
    return seconds


def layer_costs(
    layers: list[nn.Module],
    method: str,
    sample_input: torch.Tensor | None = None,
    repeats: int = 3,
) -> list[float]:
    """The cost of each layer under `method`.

    - "uniform": 1.0 per layer.
    - "params": the number of parameters the layer holds. A tied parameter
      (the Head's `lm_head.weight` is the Embedding's `wte.weight`) counts in
      EVERY layer that holds it: on a pipeline each such stage stores its own
      copy, its gradient and optimizer state, and uses it in a lookup or matmul.
    - "profile": seconds of forward + backward of each layer, fed the previous
      layer's output (layer 0 gets `sample_input`, e.g. (B, T) token ids), with
      a gradient of ones; the median of `repeats` runs after one warm-up.
      Parameters, their `.grad` and the global RNG state are left as they were.
    """
    _check_method(method)
    if method == "uniform":
        return [1.0] * len(layers)
    if method == "params":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    if sample_input is None:
        raise ValueError("the 'profile' method needs a sample_input for the first layer")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return _profile(layers, sample_input, repeats)


@dataclass(frozen=True)
class Partition:
    """Contiguous pipeline stages: stage s holds layers `bounds[s]:bounds[s + 1]`."""

    bounds: tuple[int, ...]  # num_stages + 1 boundaries, 0 first, the layer count last
    costs: tuple[float, ...]  # cost of each layer under the cost method
    method: str  # "uniform" | "params" | "profile" | "manual"

    @property
    def num_stages(self) -> int:
        """The number of stages."""
        return len(self.bounds) - 1

    def stage_layers(self, stage: int) -> range:
        """Indices of the layers of `stage`."""
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_costs(self) -> list[float]:
        """The summed layer cost of each stage."""
        return [math.fsum(self.costs[a:b]) for a, b in zip(self.bounds, self.bounds[1:])]

    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line per stage: its layers and its share of the total cost, e.g.
        `stage 0: embedding .. block 1 (3 layers) 41.2%`. `names` name the
        layers (default "layer i")."""
        n = len(self.costs)
        names = list(names) if names is not None else [f"layer {i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} names for {n} layers")
        total = math.fsum(self.costs)
        rows = []
        for s, cost in enumerate(self.stage_costs()):
            r = self.stage_layers(s)
            span = names[r[0]] if len(r) == 1 else f"{names[r[0]]} .. {names[r[-1]]}"
            count = f"({len(r)} layer{'' if len(r) == 1 else 's'})"
            share = 100.0 * cost / total if total > 0 else 0.0
            rows.append((f"stage {s}:", span, count, f"{share:.1f}%"))
        w = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(f"{a:<{w[0]}} {b:<{w[1]}} {c:<{w[2]}} {d:>{w[3]}}" for a, b, c, d in rows)


def partition(
    layers: list[nn.Module],
    num_stages: int,
    method: str = "uniform",
    split: Sequence[int] | None = None,
    sample_input: torch.Tensor | None = None,
    ranks: Sequence[int] | None = None,
) -> Partition:
    """Cut `layers` into `num_stages` contiguous stages.

    Without `split`, the cut minimises the largest stage cost under `method`,
    or with `ranks` (the rank of each stage) where a rank holds several stages,
    the largest rank load first (see `balanced_cuts`). `split` gives the inner boundaries by hand (e.g.
    [3]: two stages, the second starting at layer 3); the method then only
    supplies the costs that `describe` reports, and the partition's method is
    "manual".
    """
    _check_method(method)
    n = len(layers)
    _check_stage_count(n, num_stages)
    if split is not None:
        cuts = tuple(split)
        shown = ",".join(str(c) for c in cuts)
        if len(cuts) != num_stages - 1:
            raise ConfigError(
                f"--split {shown}: {num_stages} stages need {num_stages - 1} "
                f"cut {'index' if num_stages == 2 else 'indices'}, got {len(cuts)}"
            )
        bounds = (0, *cuts, n)
        if any(not 1 <= c <= n - 1 for c in cuts) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ConfigError(
                f"--split {shown}: cut indices must increase strictly, each between 1 and {n - 1}"
            )
    costs = tuple(layer_costs(layers, method, sample_input))
    if split is not None:
        return Partition(bounds=bounds, costs=costs, method="manual")
    return Partition(bounds=tuple(balanced_cuts(costs, num_stages, ranks)), costs=costs, method=method)
