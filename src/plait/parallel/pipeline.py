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
Between actions the executor posts the batches (`batch_isend_irecv`) that
the rank's plan lists (parallel/p2p.py): sends as soon as their action is
done, receives as soon as the simulated schedule says their data can exist,
so transfers overlap compute; the batch order is proven deadlock-free even
where a backend runs one peer's operations in order (NCCL). Sends are waited
on at the end of the step.

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
from plait.parallel.p2p import Message, messages
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
        self._outbox: dict[Message, tuple[torch.Tensor, torch.Tensor | None]] = {}  # made, not yet posted
        # How many actions early receives are posted (p2p_plan's `lead`): gloo runs operations in
        # any order, so early is safe there and lets data land during compute; NCCL needs lockstep.
        self.lead = 1 if dist.is_initialized() and dist.get_backend() == "gloo" else 0
        self._deferred: set[Message] = set()
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

    def _send(self, message: Message, tensor: torch.Tensor, key) -> None:
        """Keep an outgoing tensor (with its shape header the first time) for its batch in the plan."""
        what, stage = message[0], message[1]
        header = None
        if what == "act" and (stage, key) not in self._shapes:
            if tensor.dim() > _HEADER_LEN - 2:
                raise ValueError(f"stage {stage} outputs a {tensor.dim()}-d tensor; at most 6 dims can be sent")
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
            header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
            header[2:2 + tensor.dim()] = torch.tensor(tensor.shape)
            header = header.to(tensor.device)
            self._shapes[(stage, key)] = (tensor.shape, tensor.dtype)
        self._outbox[message] = (tensor.contiguous(), header)

    def _post(self, batch: list, key, device: torch.device, needed: Message | None = None) -> dict:
        """Post one batch of the plan; returns message -> (handles, buffer, peer) for its receives.

        The sends' handles (which keep their tensors alive) go to `_pending`. A receive
        whose shape is not known yet first posts what is gathered (the peer may be
        waiting for it) and waits for the shape header; posted early (lead > 0), it
        waits instead until the action that needs it, whose producer may still need us.
        """
        ops, ends, received = [], [], {}
        for direction, message in batch:
            what, src, dst, i = message
            label = "forward activations" if what == "act" else "backward gradients"
            tag = self._tag(src, i, _ACT if what == "act" else _GRAD)
            if direction == "send":
                tensor, header = self._outbox.pop(message)
                peer = self._peer(dst)
                if header is not None:
                    ops.append(dist.P2POp(dist.isend, header, peer, tag=self._tag(src, i, _HEADER)))
                    ends.append(("the activation shape", i, peer, None))
                ops.append(dist.P2POp(dist.isend, tensor, peer, tag=tag))
                ends.append((label, i, peer, None))
                continue
            peer = self._peer(src)
            shape_key = (src, key) if what == "act" else (dst, key)  # a gradient has its activation's shape
            if shape_key not in self._shapes:
                if self.lead and message != needed:
                    self._deferred.add(message)
                    continue
                received.update(self._issue(ops, ends))
                ops, ends = [], []
                header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
                self._wait([dist.irecv(header, peer, tag=self._tag(src, i, _HEADER))], "the activation shape", i,
                           peer)
                header = header.cpu()
                ndim = int(header[1])
                self._shapes[shape_key] = (torch.Size(header[2:2 + ndim].tolist()), _DTYPES[int(header[0])])
            shape, dtype = self._shapes[shape_key]
            buf = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
            ends.append((label, i, peer, message))
        received.update(self._issue(ops, ends))
        return received

    def _issue(self, ops: list, ends: list) -> dict:
        if not ops:
            return {}
        works = dist.batch_isend_irecv(ops)
        # A coalescing backend (NCCL) returns one handle for the whole batch; gloo, one per operation.
        handles = [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        received = {}
        for op, (label, i, peer, message), h in zip(ops, ends, handles):
            if message is None:
                self._pending.append((h, label, i, peer))
            else:
                received[message] = (h, op.tensor, peer)
        return received

    # ---- execution -----------------------------------------------------------------

    def run(self, actions: list[Action], plan: list, inputs: list[torch.Tensor], targets: list[torch.Tensor],
            loss_scale: float, on_backward: Callable[[Action], None] | None = None) -> torch.Tensor:
        """Run `actions`; returns the sum of the micro-batch losses on the last stage (0 elsewhere).

        `inputs`/`targets` are this rank's micro-batches (every rank gets them; only
        the first and last stage read them). Each micro-batch loss is multiplied by
        `loss_scale` before backward. `plan` is this rank's p2p plan for `actions`
        (parallel/p2p.py): the batches of sends and receives to post before each
        action. `on_backward(action)` is called just before each backward (the
        engine uses it to switch gradient sync on for the last one).
        Actions with kind "F" only make a forward-only run (no graph is kept).
        """
        device = inputs[0].device
        key = (tuple(inputs[0].shape), inputs[0].dtype)  # activation shapes follow the micro-batch shape
        training = any(a.kind == "B" for a in actions)
        self._pending = []
        self._deferred = set()
        saved: dict[tuple[int, int], tuple] = {}
        posted: dict[Message, tuple] = {}
        total = torch.zeros((), dtype=torch.float64, device=device)
        self.compute_s = 0.0
        grad_ctx = contextlib.nullcontext() if training else torch.no_grad()
        with grad_ctx:
            for n, action in enumerate(actions):
                needs = messages(action, self.num_stages)[0]
                for batch in plan[n]:
                    posted.update(self._post(batch, key, device, needs))
                if needs in self._deferred:
                    self._deferred.discard(needs)
                    posted.update(self._post([("recv", needs)], key, device, needs))
                got = posted.pop(needs, None) if needs is not None else None
                if got is not None:
                    handles, _, peer = got
                    self._wait(handles, "forward activations" if action.kind == "F" else "backward gradients",
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
        for batch in plan[len(actions)]:
            self._post(batch, key, device)
        assert not self._outbox, f"the plan never posts {sorted(self._outbox)}"
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
        self._send(("act", s, s + 1, i), out.detach(), key)
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
            self._send(("grad", s, s - 1, i), x.grad, key)
