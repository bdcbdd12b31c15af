"""Gradient buckets: how GradientSync (parallel/data_parallel.py) lays out the gradients it reduces.

A bucket is a flat buffer of several parameters' gradients, each parameter's `.grad` a view
of its place, so that one collective reduces them all. Its layout depends on the ZeRO level
([Note: ZeRO levels] in data_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

FIRST_BUCKET_BYTES = 1 << 20
STAGING_BUFFERS = 2  # ZeRO-2: full bucket buffers, one being filled while the other is reduced



@dataclass(eq=False)  # buckets are compared by identity (list.index)
class Bucket:
    params: list[nn.Parameter]
    key: object  # what separates buckets besides dtype and device: (stage, tied) under ZeRO
    numel: int
    padded: int  # numel rounded up to a multiple of dp under ZeRO (reduce-scatter needs equal slices)
    flat: torch.Tensor | None = None  # gradients (+ the flags' tail at level 0); None between micro-batches at 2
    views: list[torch.Tensor] | None = None
    used: list[bool] = field(default_factory=list)  # over the step
    fresh: list[bool] = field(default_factory=list)  # this micro-batch (level 2)
    pending: int = 0
    work: object = None  # level 0: the all-reduce's Work, the only thing whose wait orders its result (NCCL)
    shard: torch.Tensor | None = None  # levels 1 and 2: this rank's slice of the reduced gradients
    flag_buf: torch.Tensor | None = None  # levels 1 and 2: the used-flags, reduced at finish()
    in_flight: list = field(default_factory=list)  # (Work, full buffer, output, add?, staging buffer, done mark)
    staging: torch.Tensor | None = None  # level 2: the pooled buffer `flat` is cut from this micro-batch
    scattered: bool = False  # level 2: a reduce-scatter of this step has written `shard`

    @property
    def flags(self) -> torch.Tensor:
        """The used-flags after the reduction: how many ranks produced each parameter's gradient."""
        return self.flat[self.numel:] if self.flag_buf is None else self.flag_buf


def views_of(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def make_buckets(params: list[nn.Parameter], bucket_bytes: int, zero: int, dp_size: int, dp_rank: int,
                 keys: dict[nn.Parameter, object]) -> list[Bucket]:
    """Cut `params` into buckets, in backward's order (reversed), laid out for ZeRO `zero`.

    Level 0: gradients then one used-flag per parameter, all-reduced together. Levels 1 and 2:
    padded to a multiple of dp (reduce-scatter needs equal slices), flags apart, buckets split
    where `keys` differ; level 1's shard is its slice of the full buffer, level 2's its own.
    """
    groups: list[list[nn.Parameter]] = []
    size = 0
    keyed = zero > 0

    def kind(p):
        return p.dtype, p.device, keys.get(p) if keyed else None

    for p in reversed(params):
        # The first bucket is kept small so that sending starts early in backward.
        cap = min(bucket_bytes, FIRST_BUCKET_BYTES) if len(groups) == 1 else bucket_bytes
        fits = groups and size + p.numel() * p.element_size() <= cap
        if not (fits and kind(p) == kind(groups[-1][0])):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel() * p.element_size()
    buckets = []
    for ps in groups:
        numel = sum(p.numel() for p in ps)
        like = {"dtype": ps[0].dtype, "device": ps[0].device}
        if zero == 0:
            b = Bucket(ps, None, numel, numel, flat=torch.zeros(numel + len(ps), **like))
        else:
            padded = -(-numel // dp_size) * dp_size
            b = Bucket(ps, keys.get(ps[0]), numel, padded, flag_buf=torch.zeros(len(ps), **like))
            if zero == 1:  # the shard is this rank's slice of the full buffer, reduced in place
                b.flat = torch.zeros(padded, **like)
                shard = padded // dp_size
                b.shard = b.flat[dp_rank * shard:(dp_rank + 1) * shard]
            else:  # level 2: the shard outlives the micro-batches' full buffers
                b.shard = torch.zeros(padded // dp_size, **like)
        b.views = views_of(b.flat, ps) if b.flat is not None else None
        b.used = [False] * len(ps)
        b.fresh = [False] * len(ps)
        buckets.append(b)
    return buckets


def broadcast_parameters(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Make every replica start from the group's first rank's values (one collective per dtype)."""
    src = dist.get_global_rank(group, 0)
    by_kind: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    with torch.no_grad():
        for ps in by_kind.values():
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for p in ps:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
