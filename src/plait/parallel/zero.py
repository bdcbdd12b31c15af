"""ZeRO-1 and ZeRO-2: optimizer state (and gradients) sharded over the data-parallel group.

`ShardedOptimizer(engine, torch.optim.AdamW, lr=..., ...)` takes the place of
`torch.optim.AdamW(engine.parameters(), ...)`. Each dp rank keeps optimizer
state for 1/dp of each gradient bucket and steps only that slice; the updated
parameters are then all-gathered, so every replica ends the step with the
same parameters, as with plain data parallelism.

[Note: ZeRO levels] `zero=1` (the default) has the Engine's GradientSync
reduce-scatter each bucket once per step, so each rank receives only the
reduced gradients of its slice; `zero=2` also drops the full gradient
buffers after each micro-batch (parallel/data_parallel.py says how, and what
it costs with gradient accumulation). Either way the engine's parameters
have no `.grad` after a step: the reduced gradients are the buckets' shards,
which this optimizer steps, `Engine.clip_grad_norm_` clips and the tied-weight
sum adds. `zero=0` keeps the all-reduce and steps slices of its full result.

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
- A piece's gradient is the matching slice of the bucket's gradient shard,
  set at step() time (after clipping, which scales the shard in place): a
  parameter no rank produced a gradient for gives pieces with none, which
  torch optimizers skip, as they would the whole parameter in one process.
- Element-wise optimizers (SGD, Adam, AdamW, ...) step a piece exactly as
  they would step those elements of the whole parameter. Optimizers whose
  update depends on the whole tensor (LBFGS, Adafactor-style factored
  state) do not: they are not supported here.

Checkpoints: `state_shard` hands over this rank's slices as they are, with no
collective, and each dp rank writes its own file (plait.checkpoint): saving
never holds more of the state than this rank's slice. `load_state_dict` takes whole tensors
(a plain optimizer's state, or `state_dict`'s) or the slices any dp saved
(plait.optimizer_names.SlicedState), copying out only this rank's elements.
`state_dict` gathers the whole state to every dp rank, as torch.optim gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


from plait.optimizer_names import SlicedState
from plait.watchdog import wait


def _all_gather(output, input, group, async_op):
    # torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same arguments), which
    # older torch (>= 2.4, what plait supports) does not have. Looked up at each call, so that a
    # wrapper installed later (the tests' deferred completion) is the one called.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


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
        zero: 1 or 2 (reduce-scattered gradients; 2 also drops the full gradient buffers
            between micro-batches), or 0 (all-reduced gradients, only the state sharded).
        overlap_gather: leave the parameter all-gather running when step() returns; each layer
            waits for its own buckets just before its next forward, and anything else that
            reads or writes the parameters through the Engine waits for all of them
            ([Note: overlapped all-gather]).
        **kwargs: the optimizer's options, as for optimizer_class(params, **kwargs).
    """

    def __init__(self, engine, optimizer_class, params=None, zero: int = 1, overlap_gather: bool = False,
                 **kwargs):
        sync = engine.grad_sync
        if sync is None:
            raise ValueError("ShardedOptimizer needs data parallelism (dp >= 2); with dp=1 use the optimizer itself")
        sync.set_zero(zero)
        self.engine, self.group = engine, sync.group
        self.dp_size, self.dp_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        groups = [{"params": list(engine.parameters())}] if params is None else list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        group_of = {p: n for n, g in enumerate(groups) for p in g["params"]}
        # The caller's parameters and groups: what state_dict() is indexed by, as a torch optimizer's.
        self.full_param_groups = [list(g["params"]) for g in groups]
        self.full_params = [p for g in self.full_param_groups for p in g]
        self._offset: dict[nn.Parameter, int] = {}  # a parameter's offset in its bucket
        self._flats: list[tuple[torch.Tensor, object]] = []  # (flat parameter buffer, bucket)
        self._pieces: list[_Piece] = []
        pieces_by_group: list[list[torch.Tensor]] = [[] for _ in groups]
        for bucket in sync.buckets:
            shard = -(-bucket.numel // self.dp_size)  # ceil: the last rank's shard holds the padding
            first = bucket.params[0]
            flat = torch.zeros(shard * self.dp_size, dtype=first.dtype, device=first.device)
            lo, hi = self.dp_rank * shard, (self.dp_rank + 1) * shard
            offset = 0
            for p in bucket.params:
                view = flat[offset:offset + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                self._offset[p] = offset
                start, stop = max(offset, lo), min(offset + p.numel(), hi)
                if start < stop and p in group_of:
                    leaf = flat[start:stop].detach()  # shares the buffer: the optimizer writes into it
                    self._pieces.append(_Piece(p, start, stop, leaf))
                    pieces_by_group[group_of[p]].append(leaf)
                offset += p.numel()
            self._flats.append((flat, bucket))
        self.overlap_gather = overlap_gather
        self._in_flight: dict[int, list] = {}  # bucket index -> the works of its all-gather, not yet waited on
        if overlap_gather:
            self._hook_layers(engine, sync)
        # Every group is kept (an empty one too), so that group options line up with the caller's.
        self.optimizer = optimizer_class(
            [{**g, "params": ps} for g, ps in zip(groups, pieces_by_group)], **kwargs)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's shard with the bucket gradients, then all-gather the parameters."""
        sync = self.engine.grad_sync
        self.wait_gather()  # the last step's, if a forward has not (nothing to wait for after one)
        for piece in self._pieces:
            has = piece.param not in sync.no_grad if sync.zero > 0 else piece.param.grad is not None
            piece.leaf.grad = self._bucket_grad(piece) if has else None
        self.optimizer.step()
        self._gather_parameters()

    def _hook_layers(self, engine, sync) -> None:
        """[Note: overlapped all-gather] Buckets are filled in reverse layer order (backward's), so
        the first layers' buckets are gathered first: the first forward waits for the least. Each
        layer waits for the buckets holding its parameters in a forward pre-hook (a recomputing
        forward under activation checkpointing finds nothing left to wait for), and the Engine
        calls `wait_gather` before it hands parameters out in any other way (state_dict,
        named_parameters, ...). A bucket is always waited on whole, so a parameter shared by two
        layers (the tied weight on one rank) is ready for both."""
        index = {id(bucket): n for n, bucket in enumerate(sync.buckets)}
        for layer in engine.layers.values():
            mine = sorted({index[id(sync.bucket_of(p))] for p in layer.parameters() if p.requires_grad})
            if mine:
                layer.register_forward_pre_hook(lambda _module, _args, mine=mine: self.wait_gather(mine))
        engine.before_parameter_access(self.wait_gather)

    def wait_gather(self, buckets=None) -> None:
        """Wait for the overlapped all-gather of `buckets` (indices; None: every one still in flight)."""
        sync = self.engine.grad_sync
        for n in (sorted(self._in_flight) if buckets is None else buckets):
            for work in self._in_flight.pop(n, ()):
                wait(work, lambda s: f"{sync.me} waited {s:.0f} s in ZeRO's parameter all-gather with {sync.peers}")

    def _gather_parameters(self) -> None:
        """Every rank's updated slices to every rank, in place in the flat parameter buffers.

        [Note: all-gather on gloo] gloo's all_gather_into_tensor gathers into a buffer of its own
        the size of the output and copies it over, and took 34 ms for a 25 MiB bucket at dp=2 on
        this 2-core machine where dp broadcasts of the slices, each in place from its owner, took
        17 ms; the gathered buffer, made and freed once per bucket per step, also left the CPU
        heap holding that much more. So where the reduce-scatter is an all-reduce (gloo), the
        gather is broadcasts; NCCL's all-gather is in place and is used there.
        """
        sync = self.engine.grad_sync
        # The first layers' buckets (the last ones: buckets follow the backward) first, for the overlap.
        for n in reversed(range(len(self._flats))):
            slices = self._flats[n][0].chunk(self.dp_size)
            if sync.native_scatter:
                works = [_all_gather(self._flats[n][0], slices[self.dp_rank], group=self.group, async_op=True)]
            else:
                works = [dist.broadcast(part, src=dist.get_global_rank(self.group, owner), group=self.group,
                                        async_op=True) for owner, part in enumerate(slices)]
            self._in_flight[n] = works
        if not self.overlap_gather:
            self.wait_gather()

    def _bucket_grad(self, piece: _Piece) -> torch.Tensor:
        sync = self.engine.grad_sync
        bucket = sync.bucket_of(piece.param)
        if sync.zero == 0:
            return bucket.flat[piece.start:piece.stop]
        lo, _ = sync.shard_range(bucket)
        return bucket.shard[piece.start - lo:piece.stop - lo]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for piece in self._pieces:
            piece.leaf.grad = None
        for p in self.full_params:  # not engine.parameters(), which waits for an overlapped all-gather
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_numel(self) -> int:
        """Elements of optimizer state this rank holds (tensors with more than one element)."""
        return sum(v.numel() for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def state_dict(self) -> dict:
        """The whole optimizer's state, as torch.optim would give it over the full parameters
        (indices in `full_param_groups` order). A collective over the dp group: every dp rank calls it.

        Each state entry is gathered bucket by bucket, like the parameters; a scalar entry ("step")
        is spread over its piece's elements for the gather and read back from a parameter's first one.
        """
        keys = sorted({k for piece in self._pieces for k in self.optimizer.state.get(piece.leaf, {})})
        index = {p: i for i, p in enumerate(self.full_params)}
        state: dict[int, dict] = {}
        for flat, bucket in self._flats:
            mine = [pc for pc in self._pieces if self._where(pc.param) is bucket]
            lo = self.dp_rank * (flat.numel() // self.dp_size)
            for key in ["<has state>", *keys]:
                part = torch.zeros(flat.numel() // self.dp_size, dtype=torch.float64, device=flat.device)
                for pc in mine:
                    s = self.optimizer.state.get(pc.leaf, {})
                    if key == "<has state>":
                        part[pc.start - lo:pc.stop - lo] = 1.0 if s else 0.0
                    elif key in s:
                        part[pc.start - lo:pc.stop - lo] = s[key].reshape(-1).to(torch.float64)
                full = torch.empty_like(flat, dtype=torch.float64)
                wait(_all_gather(full, part, group=self.group, async_op=True),
                     lambda s: f"waited {s:.0f} s gathering ZeRO's optimizer state")
                offset = 0
                for p in bucket.params:
                    values = full[offset:offset + p.numel()]
                    offset += p.numel()
                    if p not in index or (key != "<has state>" and state.get(index[p]) is None):
                        continue
                    if key == "<has state>":
                        state[index[p]] = {} if values[0] == 1 else None
                    elif key == "step":  # torch keeps it as a 0-d float32 tensor
                        state[index[p]][key] = values[0].to(torch.float32).cpu()
                    else:
                        state[index[p]][key] = values.to(p.dtype).view_as(p).clone()
        groups, start = [], 0
        for group, full_group in zip(self.optimizer.param_groups, self.full_param_groups):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(full_group)))})
            start += len(full_group)
        return {"state": {i: s for i, s in state.items() if s}, "param_groups": groups}

    def state_shard(self) -> dict:
        """This rank's slice of the state, with no collective: {parameter: (begin, end, state)}, the
        state of elements [begin, end) of the flattened parameter, the torch optimizer's own tensors."""
        return {pc.param: (pc.start - self._offset[pc.param], pc.stop - self._offset[pc.param],
                           dict(self.optimizer.state[pc.leaf]))
                for pc in self._pieces if self.optimizer.state.get(pc.leaf)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full-parameter state (as `state_dict` gives, or a plain torch optimizer's over the
        same parameters in the same groups), each entry a dict of whole tensors or a `SlicedState`
        (a sharded checkpoint's): each rank keeps its pieces' slices."""
        full = dict(zip(range(len(self.full_params)), self.full_params))
        by_param = {full[i]: s for i, s in state_dict["state"].items()}
        leaves = [leaf for g in self.optimizer.param_groups for leaf in g["params"]]
        piece_of = {id(pc.leaf): pc for pc in self._pieces}
        state = {}
        for n, leaf in enumerate(leaves):
            pc = piece_of[id(leaf)]
            saved = by_param.get(pc.param)
            if saved is None:
                continue
            begin = pc.start - self._offset[pc.param]
            end = begin + pc.stop - pc.start
            if isinstance(saved, SlicedState):
                state[n] = saved.slice(begin, end)
            else:
                state[n] = {k: v.reshape(-1)[begin:end].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                            for k, v in saved.items()}
        groups, start = [], 0
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _where(self, p):
        return self.engine.grad_sync.bucket_of(p)
