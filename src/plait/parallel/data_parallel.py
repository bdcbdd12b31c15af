"""Data parallelism: bucketed gradient reduction, overlapped with backward.

Every data-parallel rank holds the same parameters and computes gradients on
its own share of the batch. `GradientSync` then sums the gradients over the
`dp` process group so that every replica takes the same optimizer step.

How (and why):
- Gradients live in flat buckets (their layout: parallel/buckets.py). A step's first gradient of a parameter is
  copied into its place in the bucket by the parameter's hook, and `.grad`
  becomes that view, so later micro-batches accumulate straight into what is
  sent and nothing is copied out. (Pointing `.grad` at a zeroed view before
  backward would cost a memset and an add where one copy does.)
- Buckets are filled in reverse registration order, the order in which
  backward produces gradients, so the last layers' bucket is ready first.
- A hook on each parameter (`register_post_accumulate_grad_hook`) counts
  the bucket down; when its last gradient is in, the bucket's reduction is
  launched asynchronously and runs while backward goes on.
- Buckets are launched strictly in index order on every rank: collectives
  must be issued in the same order everywhere or the group deadlocks.
- A parameter may get no gradient on some rank (or on all). Each bucket
  carries one "used" flag per parameter, summed over the ranks: a parameter
  no rank used gets no gradient afterwards, just as in one process; one that
  only some ranks used gets the reduced sum. The flags stay on the device;
  the Engine reads them in the same transfer as the step's loss, the step's
  one host synchronisation.
- With `sync` off (gradient accumulation), hooks only record use; nothing
  is sent until the last micro-batch.
- A schedule that splits backwards into I and W (parallel/weight_grad.py)
  adds the linear layers' weight gradients in W, outside autograd, where
  no hook fires. The step is then run in explicit mode (`prepare(explicit=True)`):
  hooks (gradients that arrive in I or B) and `add_grad` (those of W) only
  store gradients and record use, and the caller launches the reductions
  with `complete(stage)`: at levels 0 and 1 after the stage's last W (or B)
  of the step, at level 2 after each of its micro-batches' W (or B). A
  bucket is launched only once every stage it holds is complete, in index
  order as always. At level 2 the gradients wait in `.grad` (so no full
  buffer lives from a micro-batch's I to its W) and move into staged buffers
  bucket by bucket: during W, each as soon as its W gradients are in
  (`begin_weight_grads` says which are coming), the rest at `complete`.

ZeRO ([Note: ZeRO levels]; plait.parallel.zero steps the shards):
- 0: each bucket (gradients, then its flags in the tail) is all-reduced;
  every rank ends with every gradient in `.grad`.
- 1: each bucket, padded to a multiple of dp, is reduce-scattered once, at
  the last micro-batch: this rank keeps the reduced gradient of its 1/dp
  slice (`bucket.shard`), half the all-reduce's traffic (on gloo, whose
  reduce-scatter is slow, an all-reduce of which it keeps its slice: [Note:
  reduce-scatter on gloo]). The full buffers
  stay, accumulating over micro-batches as at level 0. The flags travel in
  one small all-reduce of their own at the end.
- 2: as 1, but the full buffers do not outlive a micro-batch: each
  micro-batch's bucket is reduce-scattered as soon as it is complete, added
  into the shard, and dropped. Gradient memory is 1/dp of the model plus the
  buckets in flight, for m times the traffic of level 1 with m micro-batches.
  This is the trade-off gradient accumulation forces (README, "ZeRO").
Under ZeRO the parameters' `.grad` are None after `finish()`: the reduced
gradient exists only as shards, and reading a local, unreduced `.grad` as
if it were reduced would be silently wrong.

The caller scales the loss so that the SUM over ranks is the mean over the
global batch (see Engine), which saves a pass over every buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.buckets import STAGING_BUFFERS, Bucket, broadcast_parameters, make_buckets, views_of
from plait.parallel.grad_norm import scale_, squared_norm
from plait.timing import Clock
from plait.watchdog import wait


# [Note: reduce-scatter on gloo] gloo's reduce-scatter is slower than its all-reduce of the whole
# buffer (2 dp ranks, 25 MiB float32 bucket, this 2-core machine: 99-115 ms against 41-57 ms), so
# on gloo a ZeRO bucket is all-reduced and each rank keeps its slice; the memory is the same (the
# full buffer exists until the reduction completes either way). NCCL's reduce-scatter moves half
# the all-reduce's bytes and is used there. The tests run both paths (`native_scatter`).
NATIVE_SCATTER_BACKENDS = ("nccl",)


def _reduce_scatter(output, input, group, async_op):
    # torch 2.13 deprecates reduce_scatter_tensor for reduce_scatter_single (same arguments), which
    # older torch (>= 2.4, what plait supports) does not have. Looked up at each call, not bound at
    # import, so that a wrapper installed later (the tests' deferred completion) is the one called.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


@dataclass
class SyncStats:
    """Timings of the last synchronised step, in seconds."""

    comm_s: float = 0.0  # launch to completion, summed over buckets
    exposed_s: float = 0.0  # what the step waited for after backward
    buckets: int = 0

    @property
    def hidden_fraction(self) -> float:
        """Share of the reduction time that ran behind backward."""
        return 1.0 - self.exposed_s / self.comm_s if self.comm_s > 0 else 0.0


class GradientSync:
    """Sums the gradients of `params` over `group`, bucket by bucket, during backward.

    Args:
        params: the parameters of this rank's model (tied ones listed once).
        group: the data-parallel process group.
        bucket_bytes: target bucket size; a parameter larger than this gets
            a bucket of its own.
        keys: optional {param: key}; under ZeRO two parameters with different keys never
            share a bucket (the Engine keys each pipeline stage, and a tied weight apart,
            so that both holders of a tied weight cut it into the same shards).
        stages: optional {param: the stages on this rank that use it} (several for a weight
            tied between two stages of one rank), for the explicit mode's `complete`.
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int,
                 describe=lambda r: f"rank {r}", keys: dict[nn.Parameter, object] | None = None,
                 stages: dict[nn.Parameter, set] | None = None):
        self.group = group
        self.describe = describe
        self.sync = True
        self.zero = 0
        self.dp_size, self.dp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.native_scatter = dist.get_backend(group) in NATIVE_SCATTER_BACKENDS
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        self.keys = keys or {}
        self.stages = stages or {}
        self.bucket_bytes = bucket_bytes
        self.clock = Clock(self.params[0].device if self.params else "cpu")
        broadcast_parameters(self.params, group)
        self._build()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self._timed: list[tuple] = []  # (what, bucket, launched, done) of the step's collectives
        self._waited = (None, None)  # marks around finish()'s wait
        self._flags_work = None
        self.no_grad: set[nn.Parameter] = set()  # under ZeRO: parameters no rank produced a gradient for
        self.me = describe(dist.get_rank())  # for messages
        self.peers = ", ".join(describe(r) for r in dist.get_process_group_ranks(group))

    def set_zero(self, level: int) -> None:
        """Reduce gradients as ZeRO `level` (0, 1 or 2) says, from the next step on; see the module's doc.

        Rebuilds the buckets (ZeRO pads them and keys them apart), so it is called once, before
        training: plait.parallel.zero.ShardedOptimizer does.
        """
        if level not in (0, 1, 2):
            raise ValueError(f"ZeRO level must be 0, 1 or 2 (got {level})")
        for p in self.params:
            p.grad = None  # held gradients point into the old buckets
        self.zero = level
        self.buckets, self._where, self._stage_buckets = [], {}, {}  # freed before the new ones exist
        self._build()

    def _build(self) -> None:
        self.buckets = make_buckets(self.params, self.bucket_bytes, self.zero, self.dp_size, self.dp_rank, self.keys)
        self._where: dict[nn.Parameter, tuple[Bucket, int]] = {}
        for bucket in self.buckets:
            for slot, p in enumerate(bucket.params):
                self._where[p] = (bucket, slot)
        self._next = 0
        # Level 2 reduces each backward action's buckets (one stage, one micro-batch) in index order.
        self._stage_buckets: dict[object, list[Bucket]] = {}
        for bucket in self.buckets:
            self._stage_buckets.setdefault(bucket.key[0] if bucket.key else None, []).append(bucket)
        self._stage = None  # level 2: the stage whose backward is running, and its next bucket
        self._cursor = 0
        # Explicit mode: the stages whose gradients each bucket holds (a parameter with none
        # listed waits for finish()), and the buckets holding each stage's, in index order.
        self._bucket_stages = [frozenset().union(*(self.stages.get(p) or {None} for p in b.params))
                               for b in self.buckets]
        self._touching: dict[object, list[Bucket]] = {}
        for bucket, stages in zip(self.buckets, self._bucket_stages):
            for stage in stages:
                self._touching.setdefault(stage, []).append(bucket)
        self._complete: set = set()
        self._w_left: dict[int, int] = {}  # explicit level 2: W gradients each bucket still waits for
        self.explicit = False
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # level 2: staging buffers not in use, by kind
        self._made: dict[tuple, int] = {}
        self._staging_numel = max((b.padded for b in self.buckets), default=0)

    def bucket_of(self, p: nn.Parameter) -> Bucket:
        """The bucket holding `p`'s gradient (and, under ZeRO, its flat parameter slice)."""
        return self._where[p][0]

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's slice [lo, hi) of a bucket under ZeRO (the last rank's holds the padding)."""
        size = bucket.padded // self.dp_size
        return self.dp_rank * size, (self.dp_rank + 1) * size

    def prepare(self, explicit: bool = False) -> None:
        """Before a step's first backward: reset the buckets' bookkeeping.

        `explicit`: the step's reductions are launched by `complete`, not by the hooks (a
        schedule with I and W actions; see the module's doc).

        A gradient still held from before (accumulating over several steps, level 0 or 1) is
        moved into its bucket and counts as used; a parameter whose `.grad` is None gets its
        bucket view at its first gradient, in `_on_grad`. Under ZeRO each step's reduced
        gradient replaces the last (`.grad` is None between steps).
        """
        for bucket in self.buckets:
            for slot, p in enumerate(bucket.params):
                held = p.grad is not None and bucket.views is not None
                if held and p.grad.data_ptr() != bucket.views[slot].data_ptr():
                    bucket.views[slot].copy_(p.grad)
                    p.grad = bucket.views[slot]
                bucket.used[slot] = held
                bucket.fresh[slot] = False
            bucket.pending = len(bucket.params)
            bucket.work = None
            bucket.scattered = False
        self._next = 0
        self._stage, self._cursor = None, 0
        self._timed = []
        self.no_grad = set()
        self.explicit = explicit
        self._complete = set()
        self._w_left = {}

    def begin_backward(self, stage: int, last: bool) -> None:
        """Called before each backward action (one stage, one micro-batch); `last` is the step's last
        micro-batch. Levels 0 and 1 reduce only then; level 2 reduces every micro-batch, and first
        sends what the previous action left (buckets holding a parameter that got no gradient)."""
        if self.zero < 2:
            self.sync = last
            return
        self._flush_stage()
        self._stage, self._cursor = stage, 0

    def _on_grad(self, p: nn.Parameter) -> None:
        if p.grad is None:
            # autograd calls a parameter's hooks even when its gradient is undefined, as in I for a
            # weight whose gradient was deferred to W (weight_grad.py): nothing arrived.
            return
        bucket, slot = self._where[p]
        if self.explicit and self.zero == 2:
            # Explicit level 2: the gradient stays in `.grad` (autograd adds the next micro-batch's I
            # into it) until `complete` stages the bucket: no full buffer lives from I to W.
            bucket.used[slot] = True
            return
        if self.zero == 2 and bucket.flat is None:  # this micro-batch's first gradient for the bucket
            self._drain(bucket, everything=True)  # at most one full buffer in flight per bucket
            self._stage_bucket(bucket)
        view = bucket.views[slot]
        if p.grad.data_ptr() != view.data_ptr():  # the step's (level 2: micro-batch's) first gradient
            view.copy_(p.grad)
            p.grad = None if self.zero == 2 else view  # level 2: autograd's next one starts afresh
        bucket.used[slot] = bucket.fresh[slot] = True
        if not self.sync or self.explicit:  # explicit mode: `complete` launches
            return
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def add_grad(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """Add a gradient computed outside autograd (a W action's) where `p`'s hook would put it.

        Explicit mode only: it stores and records use; `complete` launches. At levels 0 and 1
        it accumulates into the bucket view (which `.grad` then is); at level 2 into `.grad`,
        from which the bucket is sent once its W gradients are in (`begin_weight_grads`), or
        at `complete`.
        """
        assert self.explicit, "gradients from W need an explicit-mode step (prepare(explicit=True))"
        bucket, slot = self._where[p]
        bucket.used[slot] = True
        if self.zero == 2:
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
            left = self._w_left.get(id(bucket)) if self._stage is not None else None
            if left is not None:  # a W announced by begin_weight_grads: send what it has completed
                self._w_left[id(bucket)] = left - 1
                order = self._touching[self._stage]
                while self._cursor < len(order) and self._w_left[id(order[self._cursor])] <= 0:
                    self._send_staged(order[self._cursor])
                    self._cursor += 1
            return
        view = bucket.views[slot]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():  # set outside a step: move it in
            view.copy_(p.grad)
            p.grad = view
        if p.grad is None:
            view.copy_(grad)
            p.grad = view
        else:
            view.add_(grad)

    def begin_weight_grads(self, stage, params: set[nn.Parameter]) -> None:
        """Explicit level 2, before a W of `stage` that will add a gradient for each of `params`
        (the stage's deferred weights): from then on each of the stage's buckets is launched, in
        index order, as soon as its share of `params` is in, so W's gradients leave `.grad`
        while W runs instead of all waiting for its end."""
        self._stage, self._cursor = stage, 0
        self._w_left = {id(b): sum(p in params for p in b.params) for b in self._touching.get(stage, [])}

    def complete(self, stage) -> None:
        """Explicit mode: every gradient of `stage` is in, for the step (levels 0 and 1: call after
        the stage's last W or B) or for the micro-batch (level 2: after each W or B). Launches
        the reductions that were waiting only for it, in bucket order."""
        if self.zero == 2:
            # Every bucket holding one of the stage's parameters that W has not already sent, with or
            # without gradients (every replica launches the same). A bucket shared with another stage
            # of this rank (a tied weight) goes at each stage's completion: the last share is sent last.
            order = self._touching.get(stage, [])
            for bucket in order[self._cursor if self._stage == stage else 0:]:
                self._send_staged(bucket)
            self._stage, self._cursor = None, 0
            return
        self._complete.add(stage)
        while self._next < len(self.buckets) and self._bucket_stages[self._next] <= self._complete:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _send_staged(self, bucket: Bucket) -> None:
        """Level 2, explicit: move the bucket's parameters' `.grad` into a staged buffer (the pool
        bounds how many exist) and launch its reduce-scatter."""
        self._drain(bucket, everything=True)  # at most one full buffer in flight per bucket
        self._stage_bucket(bucket)
        for slot, (p, view) in enumerate(zip(bucket.params, bucket.views)):
            if p.grad is not None:
                view.copy_(p.grad)
                p.grad = None
                bucket.fresh[slot] = True
        self._launch(bucket)

    def _launch_ready(self, everything: bool = False) -> None:
        if self.zero == 2:
            order = self._stage_buckets.get(self._stage, [])
            while self._cursor < len(order) and (everything or order[self._cursor].pending == 0):
                self._launch(order[self._cursor])
                self._cursor += 1
            return
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not (everything or bucket.pending == 0):
                return
            self._launch(bucket)
            self._next += 1

    def _flush_stage(self) -> None:
        if self._stage is not None:
            self._launch_ready(everything=True)

    def _launch(self, bucket: Bucket) -> None:
        written = bucket.fresh if self.zero == 2 else bucket.used
        if bucket.flat is None:  # level 2: no gradient at all for this bucket in this micro-batch
            self._stage_bucket(bucket)
        for view, w in zip(bucket.views, written):
            if not w:  # this rank has no gradient for it: it adds zero (its place holds an old one)
                view.zero_()
        launched = self.clock.mark()
        if self.zero == 0:
            # The flags are written on the device, one fill per parameter this rank did not use:
            # a host list copied in would be a blocking copy into a CUDA bucket on every launch.
            bucket.flags.fill_(1)
            for slot, used in enumerate(bucket.used):
                if not used:
                    bucket.flags[slot] = 0
            bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
            self._timed.append(("all-reduce", bucket, launched, self.clock.mark_done(bucket.work)))
        else:
            # The first reduction of the step writes the shard; later ones (level 2) are added in.
            add = bucket.scattered
            if self.native_scatter:
                out = torch.empty_like(bucket.shard) if add else bucket.shard
                work = _reduce_scatter(out, bucket.flat, group=self.group, async_op=True)
            else:  # [Note: reduce-scatter on gloo] the whole bucket is summed; _drain keeps this rank's slice
                out = None
                work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
            done = self.clock.mark_done(work)
            bucket.in_flight.append((work, bucket.flat, out, add, bucket.staging if self.zero == 2 else None, done))
            bucket.scattered = True
            self._timed.append(("reduce-scatter", bucket, launched, done))
        bucket.pending = len(bucket.params)
        if self.zero == 2:  # dropped once its reduce-scatter is waited on (in_flight holds it till then)
            bucket.flat, bucket.views = None, None
            bucket.fresh = [False] * len(bucket.params)
            for other in self.buckets:  # free what has arrived: a full buffer lives only while in flight
                if other.in_flight:
                    self._drain(other, everything=False)

    def _stage_bucket(self, bucket: Bucket) -> None:
        """Level 2: give `bucket` a full buffer for this micro-batch, from a pool of STAGING_BUFFERS
        reused all run long (as DeepSpeed's reduction bucket): gradients then cost 1/dp of the
        model plus the pool, and nothing is allocated per micro-batch (on the CPU, freeing and
        reallocating bucket-sized blocks fragments the heap and the memory is never given back).
        When every buffer is in flight, the oldest reduction is waited for; when every one is
        being filled (gradients arriving out of bucket order), one more is made."""
        kind = (bucket.shard.dtype, bucket.shard.device)
        pool = self._pool.setdefault(kind, [])
        if not pool and self._made.get(kind, 0) >= STAGING_BUFFERS:
            for _, other, _, _ in self._timed:  # in launch order: the oldest reduction first
                self._drain(other, everything=True)  # returns its buffer to the pool
                if pool:
                    break
        if pool:
            base = pool.pop()
        else:
            base = torch.empty(self._staging_numel, dtype=kind[0], device=kind[1])
            self._made[kind] = self._made.get(kind, 0) + 1
        bucket.flat = base[:bucket.padded]
        bucket.flat[bucket.numel:].zero_()  # the padding adds nothing
        bucket.views = views_of(bucket.flat, bucket.params)
        bucket.staging = base

    def _drain(self, bucket: Bucket, everything: bool) -> None:
        n = self.buckets.index(bucket)
        while bucket.in_flight:
            work, full, out, add, staging, done = bucket.in_flight[0]
            if not everything and not work.is_completed():
                return
            wait(work, lambda s: f"{self.me} waited {s:.0f} s in the gradient reduce-scatter of bucket "
                                 f"{n + 1} of {len(self.buckets)} with {self.peers}")
            self.clock.waited(done)
            if out is None:  # summed whole: this rank's slice of it (level 1: the shard itself)
                lo, hi = self.shard_range(bucket)
                out = full[lo:hi]
                if not add and out.data_ptr() != bucket.shard.data_ptr():
                    bucket.shard.copy_(out)
            if add:
                bucket.shard.add_(out)
            bucket.in_flight.pop(0)
            if staging is not None:  # level 2: the buffer goes back to the pool
                self._pool[(staging.dtype, staging.device)].append(staging)

    def finish(self) -> list[torch.Tensor]:
        """After the last backward: launch what is left and wait for every bucket.

        Waiting on each collective's own Work orders its result before whatever reads the
        gradients next (on NCCL the compute stream waits; the host does not). Returns the
        flags, still on the device: the caller reads them with the step's loss and hands
        them (concatenated, in bucket order) to `apply_flags`.
        """
        start = self.clock.mark()
        if self.explicit and self.zero == 2:  # `complete` sent each stage's last gradients
            assert all(p.grad is None for p in self.params), "a gradient arrived after its stage's last W"
        if self.zero == 2:
            self._flush_stage()
        else:
            self._launch_ready(everything=True)  # buckets holding a parameter that got no gradient
        if self.zero > 0:
            flags = torch.cat([b.flag_buf for b in self.buckets])
            flags.fill_(1)
            offset = 0
            for bucket in self.buckets:
                for slot, used in enumerate(bucket.used):
                    if not used:
                        flags[offset + slot] = 0
                offset += len(bucket.params)
            self._flags_work = dist.all_reduce(flags, group=self.group, async_op=True)
        for n, bucket in enumerate(self.buckets):
            if self.zero == 0:
                wait(bucket.work, lambda s, n=n: f"{self.me} waited {s:.0f} s in the gradient all-reduce of "
                                                 f"bucket {n + 1} of {len(self.buckets)} with {self.peers}")
            else:
                self._drain(bucket, everything=True)
        if self.zero > 0:
            wait(self._flags_work, lambda s: f"{self.me} waited {s:.0f} s in the gradient flags' all-reduce "
                                             f"with {self.peers}")
        self._waited = (start, self.clock.mark())
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views or bucket.params):
                if self.zero > 0:
                    p.grad = None  # see the module's doc: only the shards are reduced
                elif p.grad is None:  # a parameter other ranks used gets the reduced gradient too
                    p.grad = view
        return [flags] if self.zero > 0 else [bucket.flags for bucket in self.buckets]

    def apply_flags(self, flags: list[float], keep: set[nn.Parameter] = frozenset()) -> None:
        """Given every bucket's flags read back (concatenated): a parameter no rank used loses its
        (zero) gradient, as in one process, unless it is in `keep` (a tied weight, whose other
        copy's gradient it now holds). Under ZeRO it is listed in `no_grad` instead."""
        offset = 0
        for bucket in self.buckets:
            for p, flag in zip(bucket.params, flags[offset:offset + len(bucket.params)]):
                if flag == 0 and p not in keep:
                    if self.zero > 0:
                        self.no_grad.add(p)
                    else:
                        p.grad = None
            offset += len(bucket.params)

    def shard_norm_sq(self, skip: set[nn.Parameter] = frozenset()) -> torch.Tensor:
        """Under ZeRO: the squared norm of this rank's gradient shards (buckets of `skip` left out)."""
        return squared_norm((b.shard for b in self.buckets if not skip.intersection(b.params)),
                            self.buckets[0].shard.device)

    def scale_shards_(self, scale: torch.Tensor) -> None:
        """Under ZeRO: multiply the reduced gradient shards by `scale` (clipping)."""
        scale_([bucket.shard for bucket in self.buckets], scale)

    @property
    def stats(self) -> SyncStats:
        """The last step's communication time and what of it backward hid (reads its timing marks)."""
        start, end = self._waited
        if start is None:
            return SyncStats(buckets=len(self.buckets))
        comm = sum(self.clock.seconds(launched, done) for _, _, launched, done in self._timed)
        return SyncStats(comm_s=comm, exposed_s=self.clock.seconds(start, end), buckets=len(self.buckets))

    def spans(self) -> list[tuple[str, object, object]]:
        """The last step's timed spans, as (name, start mark, end mark), for the trace."""
        what = "all-reduce" if self.zero == 0 else "reduce-scatter"
        out = [(f"wait for {what}", *self._waited)] if self._waited[0] is not None else []
        index = {id(b): n for n, b in enumerate(self.buckets)}
        return out + [(f"{kind} bucket {index[id(b)] + 1}", launched, done) for kind, b, launched, done in self._timed]
