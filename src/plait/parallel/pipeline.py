"""The pipeline executor: runs one rank's list of actions, nothing more.

A schedule (parallel/schedule.py) says what each rank does and in which
order; this module only does it. For each action:

    F(stage s, micro-batch i): take the input (the micro-batch's tokens on
        stage 0, else the activation received from stage s-1), run the stage,
        send the output to stage s+1, or on the last stage compute the loss.
    B(stage s, micro-batch i): backward from the loss (last stage) or from the
        gradient received from stage s+1; send the input's gradient to s-1;
        then drop the micro-batch's saved activations.

Communication is point-to-point, tagged by (stage, micro-batch, direction).
Between two actions the executor posts, in one `batch_isend_irecv`, what the
action just computed sends and the receive the next action needs; sends are
waited on at the end of the step. Batching matters where the backend
coalesces: NCCL runs the point-to-point operations to one peer in order on
one stream, so a receive posted on its own ahead of a send could wait for a
peer that waits for that send; in one batch they run together, as in
torch.distributed.pipelining. gloo matches messages by tag in any order but
moves data only once the receive is posted, so there the receive of the
action after next also joins the batch, before the current one computes, and
its transfer overlaps compute.

[Note: activation shapes] A receiver must allocate a buffer before data
arrives. The first time a stage boundary carries an activation for a given
input shape, the sender first sends a small header (ndim, dims, dtype); both
sides cache it, so later steps send data only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import TrainingError, peer_failure
from plait.parallel.schedule import Action, stage_rank

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]
_HEADER_LEN = 8  # dtype index, ndim, up to 6 dims
_ACT, _GRAD, _HEADER = 0, 1, 2


class PipelineExecutor:
    """Runs pipeline actions for the stages this rank holds.

    Args:
        stages: stage index -> the module of that stage (this rank's stages only).
        num_stages: stages in the whole pipeline.
        pp_ranks: global rank of each pipeline rank, in pp order (this replica's).
        loss_fn: `loss_fn(output, targets)`, a mean over the micro-batch.
        autocast: a callable returning the context to run forwards in.
        describe: global rank -> how to name it in errors, e.g. "rank 3 (dp=1, pp=1)".
    """

    def __init__(self, stages: dict[int, nn.Module], num_stages: int, pp_ranks: list[int],
                 loss_fn: Callable, autocast: Callable[[], contextlib.AbstractContextManager],
                 describe: Callable[[int], str] = lambda r: f"rank {r}"):
        self.describe = describe
        self.stages = stages
        self.num_stages = num_stages
        self.pp_ranks = pp_ranks
        self.pp_size = len(pp_ranks)
        self.loss_fn = loss_fn
        self.autocast = autocast
        self._shapes: dict[tuple, tuple[torch.Size, torch.dtype]] = {}
        self._outbox: list[tuple[dist.P2POp, str, int, int]] = []  # sends waiting for the next batch
        # Whether a receive may be posted an action early (see the module docstring).
        self.post_ahead = dist.is_initialized() and dist.get_backend() == "gloo"
        self.compute_s = 0.0  # time in forward/backward during the last run (not waiting)
        self.recorder = None  # a trace.Recorder while tracing

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[stage_rank(stage, self.pp_size)]

    def _tag(self, stage: int, microbatch: int, what: int) -> int:
        return (microbatch * self.num_stages + stage) * 3 + what

    # ---- communication -------------------------------------------------------------

    def _wait(self, works: list, what: str, microbatch: int, peer: int, sending: bool = False) -> None:
        """Wait for a transfer; if the peer is gone or silent past the timeout, say so in our terms."""
        t0 = time.monotonic()
        start = time.perf_counter()
        try:
            for work in works:
                work.wait()
            if self.recorder is not None:
                self.recorder.add("wait", f"{'send' if sending else 'wait for'} {what} {microbatch}", start,
                                  time.perf_counter(), microbatch=microbatch)
        except RuntimeError as e:
            me = self.describe(dist.get_rank())
            verb, prep = ("send", "to") if sending else ("receive", "from")
            reason = peer_failure(e)
            raise TrainingError(f"{me} waited {time.monotonic() - t0:.0f} s to {verb} {what} of micro-batch "
                                f"{microbatch} {prep} {self.describe(peer)}: {reason}") from None

    def _send(self, tensor: torch.Tensor, to_stage: int, stage: int, microbatch: int, what: int, key) -> None:
        if what == _ACT and (stage, key) not in self._shapes:
            if tensor.dim() > _HEADER_LEN - 2:
                raise ValueError(f"stage {stage} outputs a {tensor.dim()}-d tensor; at most 6 dims can be sent")
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
            header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
            header[2:2 + tensor.dim()] = torch.tensor(tensor.shape)
            self._outbox.append((dist.P2POp(dist.isend, header.to(tensor.device), self._peer(to_stage),
                                            tag=self._tag(stage, microbatch, _HEADER)),
                                 "the activation shape", microbatch, self._peer(to_stage)))
            self._shapes[(stage, key)] = (tensor.shape, tensor.dtype)
        # The op holds the tensor, which must live until the send is done.
        self._outbox.append((dist.P2POp(dist.isend, tensor.contiguous(), self._peer(to_stage),
                                        tag=self._tag(stage, microbatch, what)),
                             "forward activations" if what == _ACT else "backward gradients",
                             microbatch, self._peer(to_stage)))

    def _post(self, receives: list[tuple[dist.P2POp, torch.Tensor, int, int]]) -> list:
        """Post the outbox's sends and `receives` in one batch; returns each receive's
        (handles, buffer, what, peer), in order. The sends' handles go to `_pending`."""
        sends, self._outbox = self._outbox, []
        ops = [op for op, *_ in sends] + [op for op, *_ in receives]
        if not ops:
            return []
        works = dist.batch_isend_irecv(ops)
        # A coalescing backend returns one handle for the whole batch; gloo, one per operation.
        handles = [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        for (_, what, microbatch, peer), h in zip(sends, handles):
            self._pending.append((h, what, microbatch, peer))
        return [(h, buf, what, peer) for (_, buf, what, peer), h in zip(receives, handles[len(sends):])]

    def _receive(self, action: Action, key, device: torch.device, block: bool):
        """The receive `action` needs, as (op, buffer, what, peer); None if it needs nothing
        or (with block=False) its shape is not known yet. With block=True an unknown shape
        is received first (after posting the outbox, which the sender may be waiting for)."""
        s, i = action.stage, action.microbatch
        if action.kind == "F":
            if s == 0:
                return None
            src_stage, what = s - 1, _ACT
        else:
            if s == self.num_stages - 1:
                return None
            src_stage, what = s + 1, _GRAD
        shape_key = (s - 1, key) if what == _ACT else (s, key)  # a gradient has its activation's shape
        if shape_key not in self._shapes:
            if not block or what == _GRAD:
                return None
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
            self._post([])
            self._wait([dist.irecv(header, self._peer(src_stage), tag=self._tag(s - 1, i, _HEADER))],
                       "the activation shape", i, self._peer(src_stage))
            header = header.cpu()
            ndim = int(header[1])
            self._shapes[shape_key] = (torch.Size(header[2:2 + ndim].tolist()), _DTYPES[int(header[0])])
        shape, dtype = self._shapes[shape_key]
        buf = torch.empty(shape, dtype=dtype, device=device)
        tag = self._tag(src_stage, i, what) if what == _ACT else self._tag(s + 1, i, what)
        return dist.P2POp(dist.irecv, buf, self._peer(src_stage), tag=tag), buf, what, self._peer(src_stage)

    # ---- execution -----------------------------------------------------------------

    def run(self, actions: list[Action], inputs: list[torch.Tensor], targets: list[torch.Tensor],
            loss_scale: float, on_backward: Callable[[Action], None] | None = None) -> torch.Tensor:
        """Run `actions`; returns the sum of the micro-batch losses on the last stage (0 elsewhere).

        `inputs`/`targets` are this rank's micro-batches (every rank gets them; only
        the first and last stage read them). Each micro-batch loss is multiplied by
        `loss_scale` before backward. `on_backward(action)` is called just before
        each backward (the engine uses it to switch gradient sync on for the last one).
        Actions with kind "F" only make a forward-only run (no graph is kept).
        """
        device = inputs[0].device
        key = (tuple(inputs[0].shape), inputs[0].dtype)  # activation shapes follow the micro-batch shape
        training = any(a.kind == "B" for a in actions)
        self._pending = []
        saved: dict[tuple[int, int], tuple] = {}
        posted: dict[int, tuple] = {}
        total = torch.zeros((), dtype=torch.float64, device=device)
        self.compute_s = 0.0
        grad_ctx = contextlib.nullcontext() if training else torch.no_grad()
        with grad_ctx:
            for n, action in enumerate(actions):
                receives, wanted = [], []
                if n not in posted:
                    needed = self._receive(action, key, device, block=True)
                    receives, wanted = ([needed], [n]) if needed is not None else ([], [])
                if self.post_ahead and n + 1 < len(actions):
                    ahead = self._receive(actions[n + 1], key, device, block=False)
                    if ahead is not None:
                        receives.append(ahead)
                        wanted.append(n + 1)
                posted.update(zip(wanted, self._post(receives)))
                got = posted.pop(n, None)
                if got is not None:
                    work, _, what, peer = got
                    self._wait(work, "forward activations" if what == _ACT else "backward gradients",
                               action.microbatch, peer)
                received = got[1] if got is not None else None
                t0 = time.perf_counter()
                if action.kind == "F":
                    total += self._forward(action, received, inputs, targets, saved, loss_scale, training, key)
                else:
                    if on_backward is not None:
                        on_backward(action)
                    self._backward(action, received, saved, key)
                t1 = time.perf_counter()
                self.compute_s += t1 - t0
                if self.recorder is not None:
                    self.recorder.add(action.kind, f"{action.kind}{action.microbatch}", t0, t1,
                                      action.stage, action.microbatch)
        self._post([])
        for works, what, microbatch, peer in self._pending:
            self._wait(works, what, microbatch, peer, sending=True)
        self._pending = []
        return total

    def _forward(self, action, received, inputs, targets, saved, loss_scale, training, key) -> torch.Tensor:
        s, i = action.stage, action.microbatch
        if s == 0:
            x = inputs[i]
        else:
            x = received.requires_grad_(training)
        with self.autocast():
            out = self.stages[s](x)
        if s == self.num_stages - 1:
            with self.autocast():
                loss = self.loss_fn(out, targets[i])
            if training:
                saved[(s, i)] = (x, loss * loss_scale)
            return loss.detach().double()
        self._send(out.detach(), s + 1, s, i, _ACT, key)
        if training:
            saved[(s, i)] = (x, out)
        return torch.zeros((), dtype=torch.float64, device=out.device)

    def _backward(self, action, received, saved, key) -> None:
        s, i = action.stage, action.microbatch
        x, out = saved.pop((s, i))  # dropping them frees the micro-batch's activations
        if s == self.num_stages - 1:
            torch.autograd.backward(out)
        else:
            torch.autograd.backward(out, received)
        if s > 0:
            self._send(x.grad, s - 1, s, i, _GRAD, key)
