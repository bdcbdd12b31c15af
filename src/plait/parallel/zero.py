"""ZeRO-1, first part: optimizer state sharded over the data-parallel group.

`ShardedOptimizer(engine, torch.optim.AdamW, lr=..., ...)` takes the place of
`torch.optim.AdamW(engine.parameters(), ...)`. Each dp rank keeps optimizer
state for 1/dp of each gradient bucket and steps only that slice; the updated
parameters are then all-gathered, so every replica ends the step with the
same parameters, as with plain data parallelism.

How (and why):
- Each `GradientSync` bucket gets a flat parameter buffer laid out like its
  gradient buffer (padded to a multiple of dp, for the all-gather), and each
  parameter's `.data` becomes a view of it: the all-gather then writes
  straight into the parameters, nothing is copied back.
- This rank's shard of a bucket is cut at parameter boundaries into pieces,
  one leaf tensor per (parameter, shard) overlap, each a view of the flat
  parameter buffer. Pieces inherit their parameter's param group, so per-group
  options (weight decay only on >= 2-d weights) hold whatever the cut. The
  pieces are what the wrapped torch optimizer sees: its state is 1/dp.
- A piece's gradient is the matching slice of the bucket's gradient buffer,
  set at step() time (after clipping, which scales `.grad` in place): a
  parameter with no gradient (`.grad` None, as in one process) gives pieces
  with none, which torch optimizers skip, as they would the whole parameter.
- Element-wise optimizers (SGD, Adam, AdamW, ...) step a piece exactly as
  they would step those elements of the whole parameter. Optimizers whose
  update depends on the whole tensor (LBFGS, Adafactor-style factored
  state) do not: they are not supported here.

Not yet done (issue 16 item 2): gradients are still all-reduced in full (a
reduce-scatter mode of GradientSync would halve that traffic), ZeRO-2, and
checkpoints (`state_dict` refuses rather than save a shard under full names).
The all-gather is synchronous: its result is read only after it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Piece:
    param: nn.Parameter  # the full parameter this piece is part of
    start: int  # offset in the bucket's gradient / flat parameter buffer
    stop: int
    leaf: torch.Tensor  # what the torch optimizer steps: a view of the flat parameter buffer


class ShardedOptimizer:
    """Wraps a torch.optim optimizer class so that each dp rank holds and steps 1/dp of the state.

    Args:
        engine: a plait.Engine with data parallelism (dp >= 2).
        optimizer_class: any element-wise torch.optim optimizer class (SGD, Adam, AdamW, ...).
        params: the engine's parameters, or param groups (dicts with "params") over them;
            None means all of engine.parameters() in one group.
        **kwargs: the optimizer's options, as for optimizer_class(params, **kwargs).
    """

    def __init__(self, engine, optimizer_class, params=None, **kwargs):
        sync = engine.grad_sync
        if sync is None:
            raise ValueError("ShardedOptimizer needs data parallelism (dp >= 2); with dp=1 use the optimizer itself")
        self.engine, self.group = engine, sync.group
        self.dp_size, self.dp_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        groups = [{"params": list(engine.parameters())}] if params is None else list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        group_of = {p: n for n, g in enumerate(groups) for p in g["params"]}
        self._flats: list[tuple[torch.Tensor, object]] = []  # (flat parameter buffer, bucket)
        self._pieces: list[_Piece] = []
        pieces_by_group: list[list[torch.Tensor]] = [[] for _ in groups]
        for bucket in sync.buckets:
            shard = -(-bucket.numel // self.dp_size)  # ceil: the last rank's shard holds the padding
            flat = torch.zeros(shard * self.dp_size, dtype=bucket.flat.dtype, device=bucket.flat.device)
            lo, hi = self.dp_rank * shard, (self.dp_rank + 1) * shard
            offset = 0
            for p in bucket.params:
                view = flat[offset:offset + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                start, stop = max(offset, lo), min(offset + p.numel(), hi)
                if start < stop and p in group_of:
                    leaf = flat[start:stop].detach()  # shares the buffer: the optimizer writes into it
                    self._pieces.append(_Piece(p, start, stop, leaf))
                    pieces_by_group[group_of[p]].append(leaf)
                offset += p.numel()
            self._flats.append((flat, bucket))
        # Every group is kept (an empty one too), so that group options line up with the caller's.
        self.optimizer = optimizer_class(
            [{**g, "params": ps} for g, ps in zip(groups, pieces_by_group)], **kwargs)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's shard with the bucket gradients, then all-gather the parameters."""
        for piece in self._pieces:
            grad = piece.param.grad
            piece.leaf.grad = None if grad is None else self._bucket_grad(piece)
        self.optimizer.step()
        for flat, _ in self._flats:
            mine = flat.chunk(self.dp_size)[self.dp_rank]
            dist.all_gather_into_tensor(flat, mine.clone(), group=self.group)

    def _bucket_grad(self, piece: _Piece) -> torch.Tensor:
        bucket = self.engine.grad_sync._where[piece.param][0]
        return bucket.flat[piece.start:piece.stop]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for piece in self._pieces:
            piece.leaf.grad = None
        for p in self.engine.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_numel(self) -> int:
        """Elements of optimizer state this rank holds (tensors with more than one element)."""
        return sum(v.numel() for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def state_dict(self):
        raise NotImplementedError("checkpoints of a ShardedOptimizer are not written yet (issue 16 item 2)")
