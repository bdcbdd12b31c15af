"""The pipeline executor: runs one rank's list of actions, nothing more.

A schedule (parallel/schedule.py) says what each rank does and in which
order; this module only does it. For each action:

    F(stage s, micro-batch i): take the input (the micro-batch's tokens on
        stage 0, else the activation received from stage s-1), run the stage,
        send the output to stage s+1, or on the last stage compute the loss.
    B(stage s, micro-batch i): backward from the loss (last stage) or from the
        gradient received from stage s+1; send the input's gradient to s-1;
        then drop the micro-batch's saved activations.
    I(stage s, micro-batch i): as B, but the weight gradients of the stage's
        linear layers are queued instead of computed (parallel/weight_grad.py):
        the gradient to s-1 goes out as soon as it exists.
    W(stage s, micro-batch i): compute and accumulate the gradients I queued
        for (s, i); no message.

Communication is point-to-point, tagged by (stage, micro-batch, direction).
Between actions the executor posts the batches (`batch_isend_irecv`) that
the rank's plan lists (parallel/p2p.py): sends as soon as their action is
done, receives as soon as the simulated schedule says their data can exist,
so transfers overlap compute; the batch order is proven deadlock-free even
where a backend runs one peer's operations in order (NCCL). Sends are waited
on at the end of the step.

Activation shapes are learned once per input shape, before the first step,
by a probe along the pipeline ([Note: activation shapes] in p2p.py), so
both ends of every message post identical batches. Waits go through
plait.watchdog (a silent peer is named on any backend); times are marks of
plait.timing (CUDA events on a GPU), read only after the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.p2p import Message, messages, shape_plan
from plait.parallel.schedule import Action, stage_rank
from plait.parallel.weight_grad import WeightGradStore, deferred_forward
from plait.timing import Clock
from plait.watchdog import wait

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]
_HEADER_LEN = 8  # dtype index, ndim, up to 6 dims
_ACT, _GRAD, _HEADER = 0, 1, 2
_FAILED = -1  # a shape header's dtype slot when the sender's stage output cannot cross the cut


class PipelineCutError(TypeError):
    """A stage's output cannot cross a pipeline cut (not one floating-point tensor)."""


class PipelineExecutor:
    """Runs pipeline actions for the stages this rank holds.

    Args:
        stages: stage index -> the module of that stage (this rank's stages only).
        num_stages: stages in the whole pipeline.
        pp_ranks: global rank of each pipeline rank, in pp order (this replica's).
        loss_fn: `loss_fn(output, targets)`, a mean over the micro-batch.
        autocast: a callable returning the context to run forwards in.
        describe: global rank -> how to name it in errors, e.g. "rank 3 (dp=1, pp=1)".
        stage_layers: stage -> indices of its layers in the whole model (named in errors).
        layout: how stages sit on pipeline ranks ("loop", or "v" for zbv: parallel/schedule.py).
    """

    def __init__(self, stages: dict[int, nn.Module], num_stages: int, pp_ranks: list[int],
                 loss_fn: Callable, autocast: Callable[[], contextlib.AbstractContextManager],
                 describe: Callable[[int], str] = lambda r: f"rank {r}",
                 stage_layers: dict[int, Sequence[int]] | None = None, layout: str = "loop"):
        self.describe = describe
        self.layout = layout
        self.stage_layers = stage_layers or {}  # stage -> indices of its layers in the whole model, for messages
        self.stages = stages
        self.num_stages = num_stages
        self.pp_ranks = pp_ranks
        self.pp_size = len(pp_ranks)
        self.loss_fn = loss_fn
        self.autocast = autocast
        # input key -> {stage s: (shape, dtype) of what s sends to s+1}; a gradient has its activation's shape
        self._shapes: dict[tuple, dict[int, tuple[torch.Size, torch.dtype]]] = {}
        self._outbox: dict[Message, torch.Tensor] = {}  # made, not yet posted
        self._local: dict[Message, torch.Tensor] = {}  # made for a stage of this same rank: handed over, not sent
        # How many actions early receives are posted (p2p_plan's `lead`): gloo runs operations in
        # any order, so early is safe there and lets data land during compute; NCCL needs lockstep.
        self.lead = 1 if dist.is_initialized() and dist.get_backend() == "gloo" else 0
        self.clock: Clock | None = None  # made at the first run, on the inputs' device
        self._compute: list[tuple] = []  # (start, end, action) of each compute action of the last run
        self.recorder = None  # a trace.Recorder while tracing
        # What I actions queue for W, per (stage, micro-batch); the Engine sets where W's gradients go.
        self.weight_grads = WeightGradStore()
        self._split_keys: set[tuple[int, int]] = set()

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[stage_rank(stage, self.pp_size, self.layout)]

    def _tag(self, stage: int, microbatch: int, what: int) -> int:
        return (microbatch * self.num_stages + stage) * 3 + what

    @property
    def compute_s(self) -> float:
        """Time in forward/backward during the last run (not waiting); read after the step."""
        return sum(self.clock.seconds(a, b) for a, b, _ in self._compute)

    def compute_window(self) -> tuple[float, float]:
        """(start of the first compute action, end of the last) of the last run, in `time.perf_counter`
        seconds, which processes on one machine share: on the CPU only (a GPU's marks are events)."""
        return self._compute[0][0], self._compute[-1][1]

    def action_windows(self) -> list[tuple[Action, float, float]]:
        """Each compute action of the last run with its start and end, as `compute_window` (CPU only)."""
        return [(action, a, b) for a, b, action in self._compute]

    def action_seconds(self) -> list[tuple[Action, float]]:
        """Each compute action of the last run with its time (what `simulate` takes as costs)."""
        return [(action, self.clock.seconds(a, b)) for a, b, action in self._compute]

    # ---- communication -------------------------------------------------------------

    def _wait(self, works: list, what: str, microbatch: int, peer: int, sending: bool = False) -> None:
        """Wait for a transfer; a peer that is gone or silent past the timeout is named in our terms."""
        start = self.clock.mark() if self.recorder is not None else None
        me = self.describe(dist.get_rank())
        verb, prep = ("send", "to") if sending else ("receive", "from")
        for work in works:
            wait(work, lambda s: f"{me} waited {s:.0f} s to {verb} {what} of micro-batch {microbatch} "
                                 f"{prep} {self.describe(peer)}", peer)
        if start is not None:
            self.recorder.add("wait", f"{'send' if sending else 'wait for'} {what} {microbatch}", start,
                              self.clock.mark(), microbatch=microbatch)

    def _post(self, batch: list, shapes: dict, device: torch.device) -> dict:
        """Post one batch of the plan; returns message -> (handles, buffer, peer) for its receives.

        The sends' handles (which keep their tensors alive until the end of the step) go to `_pending`.
        """
        ops, ends = [], []
        for direction, message in batch:
            what, src, dst, i = message
            label = "forward activations" if what == "act" else "backward gradients"
            tag = self._tag(src, i, _ACT if what == "act" else _GRAD)
            if direction == "send":
                peer = self._peer(dst)
                ops.append(dist.P2POp(dist.isend, self._outbox.pop(message), peer, tag=tag))
                ends.append((label, i, peer, None))
            else:
                peer = self._peer(src)
                shape, dtype = shapes[src if what == "act" else dst]
                ops.append(dist.P2POp(dist.irecv, torch.empty(shape, dtype=dtype, device=device), peer, tag=tag))
                ends.append((label, i, peer, message))
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

    def _probe_shapes(self, key, first_input: torch.Tensor) -> dict:
        """Learn what crosses each stage boundary for inputs like `first_input`: see p2p.shape_plan.

        Each stage runs once on one micro-batch (zeros of the received shape after
        stage 0), without autograd and with the RNG state put back afterwards, so
        the step that follows draws exactly the random numbers it would have.

        It is also where a layer that a cut cannot carry is caught: what crosses a
        cut must be one floating-point tensor (its gradient comes back the other
        way). The rank that finds one sends an error header instead of a shape, so
        every rank downstream stops with a message too instead of waiting.
        """
        me = stage_rank(min(self.stages), self.pp_size, self.layout)
        shapes: dict[int, tuple[torch.Size, torch.dtype]] = {}
        device = first_input.device
        out, failure = None, None
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for step in shape_plan(self.pp_size, self.num_stages // self.pp_size, self.layout)[me]:
                if isinstance(step, tuple):  # ("run", s)
                    s = step[1]
                    if s == self.num_stages - 1 or failure is not None:  # the last stage's output crosses nothing
                        continue
                    x = first_input if s == 0 else out
                    with self.autocast():
                        out = self.stages[s](x)
                    failure = self._cannot_cross(s, out)
                    if failure is None:
                        shapes[s] = (out.shape, out.dtype)
                    continue
                direction, (_, src, dst, _) = step[0]
                header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
                if direction == "send":
                    if failure is not None:
                        header[0] = _FAILED
                    else:
                        header[0], header[1] = _DTYPES.index(out.dtype), out.dim()
                        header[2:2 + out.dim()] = torch.tensor(out.shape, device=device)
                    peer, op = self._peer(dst), dist.isend
                else:
                    peer, op = self._peer(src), dist.irecv
                works = dist.batch_isend_irecv([dist.P2POp(op, header, peer, tag=self._tag(src, 0, _HEADER))])
                self._wait(works, "the activation shape", 0, peer, sending=direction == "send")
                if direction == "recv":  # once per input shape, before the first step: this read is not in a step
                    values = header.tolist()
                    if values[0] == _FAILED:
                        failure = failure or (f"stage {dst} on {self.describe(dist.get_rank())} has no input: stage "
                                              f"{src} on {self.describe(peer)} could not send its output "
                                              f"(that rank's error says why)")
                        continue
                    shapes[src] = (torch.Size(values[2:2 + values[1]]), _DTYPES[values[0]])
                    out = torch.zeros(shapes[src][0], dtype=shapes[src][1], device=device)
        if failure is not None:
            raise PipelineCutError(failure)
        self._shapes[key] = shapes
        return shapes

    def _cannot_cross(self, stage: int, out) -> str | None:
        """Why `out`, stage `stage`'s output, cannot cross to the next stage; None if it can."""
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype in _DTYPES \
                and out.dim() <= _HEADER_LEN - 2:
            return None
        if isinstance(out, torch.Tensor):
            what = (f"a {out.dim()}-d tensor (at most {_HEADER_LEN - 2} dims cross a cut)"
                    if out.is_floating_point() and out.dtype in _DTYPES else
                    f"a {str(out.dtype).removeprefix('torch.')} tensor (its gradient cannot come back)")
        else:
            what = f"a {type(out).__name__}" if out is not None else "None"
        layers = self.stage_layers.get(stage)
        layer = f"layer {layers[-1]}, the last of stage {stage}" if layers else f"the last layer of stage {stage}"
        return (f"{layer} on {self.describe(dist.get_rank())}, returned {what}; what crosses a pipeline cut must be "
                f"one floating-point tensor: return one from that layer, or cut elsewhere (--split)")

    # ---- execution -----------------------------------------------------------------

    def run(self, actions: list[Action], plan: list, inputs: list[torch.Tensor], targets: list[torch.Tensor],
            loss_scale: float, on_backward: Callable[[Action], None] | None = None,
            after_backward: Callable[[Action], None] | None = None) -> torch.Tensor:
        """Run `actions`; returns the sum of the micro-batch losses on the last stage (0 elsewhere).

        `inputs`/`targets` are this rank's micro-batches (every rank gets them; only
        the first and last stage read them). Each micro-batch loss is multiplied by
        `loss_scale` before backward. `plan` is this rank's p2p plan for `actions`
        (parallel/p2p.py): the batches of sends and receives to post before each
        action. `on_backward(action)` is called just before each backward (B, I
        or W; the engine uses it to switch gradient sync on for the last one), and
        `after_backward(action)` just after (where the engine starts the reduction
        of gradients that W completed).
        Actions with kind "F" only make a forward-only run (no graph is kept).
        """
        device = inputs[0].device
        if self.clock is None:
            self.clock = Clock(device)
        key = (tuple(inputs[0].shape), inputs[0].dtype)  # activation shapes follow the micro-batch shape
        shapes = self._shapes.get(key)
        if shapes is None:
            shapes = self._probe_shapes(key, inputs[0]) if self.pp_size > 1 else {}
        training = any(a.kind in ("B", "I") for a in actions)
        # The forwards whose backward is an I build no weight-gradient graph (weight_grad.py).
        self._split_keys = {(a.stage, a.microbatch) for a in actions if a.kind == "I"}
        # A step that failed part-way may have left W work queued, or a hand-over untaken: they
        # belong to no step now.
        self.weight_grads.clear()
        self._local.clear()
        self._pending = []
        self._compute = []
        saved: dict[tuple[int, int], tuple] = {}
        posted: dict[Message, tuple] = {}
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_ctx = contextlib.nullcontext() if training else torch.no_grad()
        with grad_ctx:
            for n, action in enumerate(actions):
                for batch in plan[n]:
                    posted.update(self._post(batch, shapes, device))
                needs = messages(action, self.num_stages)[0]
                if needs in self._local:  # made by a stage of this rank (a V layout's turn, or pp = 1)
                    received = self._local.pop(needs)
                else:
                    got = posted.pop(needs, None) if needs is not None else None
                    if got is not None:
                        handles, _, peer = got
                        self._wait(handles, "forward activations" if action.kind == "F" else "backward gradients",
                                   action.microbatch, peer)
                    received = got[1] if got is not None else None
                t0 = self.clock.mark()
                if action.kind == "F":
                    total += self._forward(action, received, inputs, targets, saved, loss_scale, training)
                else:
                    if on_backward is not None:
                        on_backward(action)
                    key = (action.stage, action.microbatch)
                    if action.kind == "W":
                        self.weight_grads.run(key)
                    elif action.kind == "I":
                        with self.weight_grads.deferring(key):
                            self._backward(action, received, saved)
                    else:
                        self._backward(action, received, saved)
                t1 = self.clock.mark()
                self._compute.append((t0, t1, action))
                if self.recorder is not None:
                    self.recorder.add(action.kind, f"{action.kind}{action.microbatch}", t0, t1,
                                      action.stage, action.microbatch)
                if after_backward is not None and action.kind != "F":
                    after_backward(action)  # launches reductions: not compute
        for batch in plan[len(actions)]:
            self._post(batch, shapes, device)
        assert not self._outbox, f"the plan never posts {sorted(self._outbox)}"
        assert not self._local, f"no stage took {sorted(self._local)}"
        assert not self.weight_grads.pending(), f"no W ran for {self.weight_grads.pending()}"
        for works, what, microbatch, peer in self._pending:
            self._wait(works, what, microbatch, peer, sending=True)
        self._pending = []
        return total

    def _forward(self, action, received, inputs, targets, saved, loss_scale, training) -> torch.Tensor:
        s, i = action.stage, action.microbatch
        if s == 0:
            x = inputs[i]
        else:
            x = received.requires_grad_(training)
        with self.autocast(), deferred_forward() if (s, i) in self._split_keys else contextlib.nullcontext():
            out = self.stages[s](x)
        if s == self.num_stages - 1:
            with self.autocast():
                loss = self.loss_fn(out, targets[i])
            if training:
                saved[(s, i)] = (x, loss * loss_scale)
            return loss.detach().double()
        self._send(("act", s, s + 1, i), out.detach().contiguous())
        if training:
            saved[(s, i)] = (x, out)
        return torch.zeros((), dtype=torch.float64, device=out.device)

    def _send(self, message: Message, tensor: torch.Tensor) -> None:
        """Queue `tensor` for the plan to post, or hand it over if its stage is on this rank
        (the plan has no operation for it: p2p_plan)."""
        if self._peer(message[2]) == self._peer(message[1]):
            self._local[message] = tensor
        else:
            self._outbox[message] = tensor

    def _backward(self, action, received, saved) -> None:
        s, i = action.stage, action.microbatch
        x, out = saved.pop((s, i))  # dropping them frees the micro-batch's activations
        if s == self.num_stages - 1:
            torch.autograd.backward(out)
        else:
            torch.autograd.backward(out, received)
        if s > 0:
            self._send(("grad", s, s - 1, i), x.grad.contiguous())
