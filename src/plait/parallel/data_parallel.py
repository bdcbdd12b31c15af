"""Data parallelism: bucketed gradient all-reduce, overlapped with backward.

Every data-parallel rank holds the same parameters and computes gradients on
its own share of the batch. `GradientSync` then sums the gradients over the
`dp` process group so that every replica takes the same optimizer step.

How (and why):
- Gradients live in flat buckets. A step's first gradient of a parameter is
  copied into its place in the bucket by the parameter's hook, and `.grad`
  becomes that view, so later micro-batches accumulate straight into what is
  sent and nothing is copied out. (Pointing `.grad` at a zeroed view before
  backward would cost a memset and an add where one copy does.)
- Buckets are filled in reverse registration order, the order in which
  backward produces gradients, so the last layers' bucket is ready first.
- A hook on each parameter (`register_post_accumulate_grad_hook`) counts
  the bucket down; when its last gradient is in, the bucket's all-reduce is
  launched asynchronously and runs while backward goes on.
- Buckets are launched strictly in index order on every rank: collectives
  must be issued in the same order everywhere or the group deadlocks.
- A parameter may get no gradient on some rank (or on all). Each bucket
  carries one "used" flag per parameter in its tail, summed with the
  gradients: a parameter no rank used gets `.grad = None` afterwards, just
  as in one process; one that only some ranks used gets the reduced sum.
  The flags stay on the device; the Engine reads them in the same transfer
  as the step's loss, the step's one host synchronisation.
- With `sync` off (gradient accumulation), hooks only record use; nothing
  is sent until the last micro-batch.

The caller scales the loss so that the SUM over ranks is the mean over the
global batch (see Engine), which saves a pass over every buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plait.timing import Clock
from plait.watchdog import wait


FIRST_BUCKET_BYTES = 1 << 20


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    flat: torch.Tensor  # (numel of all params + one used-flag per param,)
    views: list[torch.Tensor]
    numel: int
    used: list[bool] = field(default_factory=list)
    pending: int = 0
    work: object = None  # the all-reduce's Work: the only thing whose wait orders its result (NCCL)
    launched: object = None  # timing marks (plait.timing): launch and completion of the all-reduce
    done: object = None

    @property
    def flags(self) -> torch.Tensor:
        """The used-flags after the all-reduce: how many ranks produced each parameter's gradient."""
        return self.flat[self.numel:]


@dataclass
class SyncStats:
    """Timings of the last synchronised step, in seconds."""

    comm_s: float = 0.0  # launch to completion, summed over buckets
    exposed_s: float = 0.0  # what the step waited for after backward
    buckets: int = 0

    @property
    def hidden_fraction(self) -> float:
        """Share of the all-reduce time that ran behind backward."""
        return 1.0 - self.exposed_s / self.comm_s if self.comm_s > 0 else 0.0


class GradientSync:
    """Sums the gradients of `params` over `group`, bucket by bucket, during backward.

    Args:
        params: the parameters of this rank's model (tied ones listed once).
        group: the data-parallel process group.
        bucket_bytes: target bucket size; a parameter larger than this gets
            a bucket of its own.
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int,
                 describe=lambda r: f"rank {r}"):
        self.group = group
        self.describe = describe
        self.sync = True
        params = [p for p in dict.fromkeys(params) if p.requires_grad]
        self.clock = Clock(params[0].device if params else "cpu")
        broadcast_parameters(params, group)
        self.buckets = self._make_buckets(params, bucket_bytes)
        self._where: dict[nn.Parameter, tuple[_Bucket, int]] = {}
        for bucket in self.buckets:
            for slot, p in enumerate(bucket.params):
                self._where[p] = (bucket, slot)
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._next = 0
        self._waited = (None, None)  # marks around finish()'s wait
        self._me = describe(dist.get_rank())  # for messages
        self._peers = ", ".join(describe(r) for r in dist.get_process_group_ranks(group))

    def bucket_of(self, p: nn.Parameter) -> _Bucket:
        """The bucket holding `p`'s gradient (and, under ZeRO, its flat parameter slice)."""
        return self._where[p][0]

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(params):  # backward's order
            # The first bucket is kept small so that sending starts early in backward.
            cap = min(bucket_bytes, FIRST_BUCKET_BYTES) if len(groups) == 1 else bucket_bytes
            fits = groups and size + p.numel() * p.element_size() <= cap
            same_kind = groups and (p.dtype, p.device) == (groups[-1][0].dtype, groups[-1][0].device)
            if not (fits and same_kind):
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel() * p.element_size()
        buckets = []
        for ps in groups:
            numel = sum(p.numel() for p in ps)
            flat = torch.zeros(numel + len(ps), dtype=ps[0].dtype, device=ps[0].device)
            views, offset = [], 0
            for p in ps:
                views.append(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            buckets.append(_Bucket(ps, flat, views, numel, used=[False] * len(ps)))
        return buckets

    def prepare(self) -> None:
        """Before a step's first backward: reset the buckets' bookkeeping.

        A gradient still held from before (accumulating over several steps) is
        moved into its bucket and counts as used; a parameter whose `.grad` is
        None gets its bucket view at its first gradient, in `_on_grad`.
        """
        for bucket in self.buckets:
            for slot, (p, view) in enumerate(zip(bucket.params, bucket.views)):
                held = p.grad is not None
                if held and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                    p.grad = view
                bucket.used[slot] = held
            bucket.pending = len(bucket.params)
            bucket.work = None
        self._next = 0

    def _on_grad(self, p: nn.Parameter) -> None:
        bucket, slot = self._where[p]
        view = bucket.views[slot]
        if p.grad.data_ptr() != view.data_ptr():  # the step's first gradient: autograd's own tensor
            view.copy_(p.grad)
            p.grad = view
        bucket.used[slot] = True
        if not self.sync:
            return
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch_ready(self, everything: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not (everything or bucket.pending == 0):
                return
            self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        # The flags are written on the device, one fill per parameter this rank did not use:
        # a host list copied in would be a blocking copy into a CUDA bucket on every launch.
        bucket.flags.fill_(1)
        for slot, (view, used) in enumerate(zip(bucket.views, bucket.used)):
            if not used:  # this rank has no gradient for it: it adds zero (its place holds an old step's)
                view.zero_()
                bucket.flags[slot] = 0
        bucket.launched = self.clock.mark()
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        bucket.done = self.clock.mark_done(bucket.work)

    def finish(self) -> list[torch.Tensor]:
        """After the last backward: launch what is left and wait for every bucket.

        Waiting on each all-reduce's own Work orders its result before whatever
        reads the gradients next (on NCCL the compute stream waits; the host
        does not). Returns each bucket's flags, still on the device: the caller
        reads them with the step's loss and hands them to `apply_flags`.
        """
        start = self.clock.mark()
        self._launch_ready(everything=True)  # buckets holding a parameter that got no gradient
        for n, bucket in enumerate(self.buckets):
            wait(bucket.work, lambda s, n=n: f"{self._me} waited {s:.0f} s in the gradient all-reduce of bucket "
                                             f"{n + 1} of {len(self.buckets)} with {self._peers}")
        self._waited = (start, self.clock.mark())
        for bucket in self.buckets:  # a parameter other ranks used gets the reduced gradient too
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is None:
                    p.grad = view
        return [bucket.flags for bucket in self.buckets]

    def apply_flags(self, flags: list[float], keep: set[nn.Parameter] = frozenset()) -> None:
        """Given every bucket's flags read back (concatenated): a parameter no rank used loses its
        (zero) gradient, as in one process, unless it is in `keep` (a tied weight, whose other
        copy's gradient it now holds)."""
        offset = 0
        for bucket in self.buckets:
            for p, flag in zip(bucket.params, flags[offset:offset + len(bucket.params)]):
                if flag == 0 and p not in keep:
                    p.grad = None
            offset += len(bucket.params)

    @property
    def stats(self) -> SyncStats:
        """The last step's communication time and what of it backward hid (reads its timing marks)."""
        start, end = self._waited
        if start is None:
            return SyncStats(buckets=len(self.buckets))
        comm = sum(self.clock.seconds(b.launched, b.done) for b in self.buckets)
        return SyncStats(comm_s=comm, exposed_s=self.clock.seconds(start, end), buckets=len(self.buckets))

    def spans(self) -> list[tuple[str, object, object]]:
        """The last step's timed spans, as (name, start mark, end mark), for the trace."""
        out = [("wait for all-reduce", *self._waited)] if self._waited[0] is not None else []
        return out + [(f"all-reduce bucket {n + 1}", b.launched, b.done) for n, b in enumerate(self.buckets)]


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
