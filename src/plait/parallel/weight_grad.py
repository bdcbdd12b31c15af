"""The backward split into I (input gradients) and W (weight gradients), by per-operation deferral.

A zero-bubble schedule runs the backward of a (stage, micro-batch) in two actions: I, the
gradient with respect to the stage's input (what the previous stage waits for), and W, the
gradients with respect to the weights (what nobody waits for), which fill the bubbles.

How: the `nn.Linear` modules of a stage run `linear` below (`defer_linears` replaces their
`forward` on the instance; the module objects, their parameters and `state_dict` keys are
unchanged, and so is a weight tied to another module). Two ways, one result:
- Inside `deferred_forward()` -- the executor's F of a (stage, micro-batch) whose backward is
  an I -- it is F.linear itself on the detached weight and bias, so autograd's own C++ backward
  computes the input gradient and no weight gradient; a hook on the output queues the layer's
  input and its output gradient when the backward reaches it, which must be inside a store's
  `deferring`. No Python runs per layer in the backward but that hook.
- Otherwise, a custom autograd function whose backward computes the input gradient at once and,
  while a `WeightGradStore` is deferring (an I), queues the same pair instead of returning the
  weight and bias gradients; with no store deferring (a B action, evaluation, one process) it
  returns every gradient as F.linear's backward would.
W (`WeightGradStore.run`) computes the queued gradients and hands them to the store's
`accumulate`: into `.grad`, as AccumulateGrad would, or into the data-parallel buckets
(GradientSync.add_grad).

Why the first way where it can: measured on the benchmark GPT's last stage (two blocks and the
LM head, 2 x 128 tokens a micro-batch, one thread), F + I + W took 1.02-1.04 of a plain F + B
with it against 1.04-1.06 with the custom function, whose Python forward and backward run per
layer and per micro-batch. It needs to know at forward time that the backward will be an I:
the executor does (the schedule says so), a user's own backward may not, so the function stays.
Autograd saves no layer input for a detached weight's product: the hook, then the queue, holds it
until W, and `held_inputs()` lists those held, for a count of activation memory.

Why this way and not two `autograd.grad` walks (torch's split): measured on plait's GPT blocks
(/work/shared/notes/backward-split-measured.md), the second walk costs I + W = 1.48 x B, and
keeps the micro-batch's whole graph alive until W; deferral costs 0.98 x B and keeps only each
linear layer's (input, output gradient) pair.

What is deferred: the weight and bias of every `nn.Linear` (that class exactly: a subclass may
have a forward of its own) whose weight is a leaf tensor that requires a gradient (a Parameter). Every other parameterised module -- LayerNorm, Embedding,
a user's own layer, a Linear whose weight is computed (a parametrization) -- gets its gradients
in I, exactly, through autograd as usual. A weight used at several places (the tied embedding
and LM head on one rank, a Linear called twice) gets each deferred use's gradient summed in W
in the order autograd would sum them, then added once; a use that is not deferred (the
embedding lookup) adds its share in I.

Exactness: the gradients are computed with the same matrix products autograd uses for F.linear
(`grad_out @ W` for the input, `grad_out^T @ x` for the weight, `grad_out` summed over rows for
the bias), in the same dtype: under autocast the inputs are cast to the autocast dtype as
autocast casts them (floating tensors other than float64), the products run in it, and the
weight gradient is returned in the parameter's dtype, as autocast's cast backward returns it.
Tests hold the results bit-equal to a plain backward in float32 and float64 where autograd sums
the same terms in the same order (tests/parallel/test_weight_grad.py says where it cannot).
Parameters' post-accumulate-grad hooks do not fire for gradients added in W: plait's one user of
them, GradientSync, takes those gradients through `add_grad` instead.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

# The queue of the (stage, micro-batch) whose I is running, or None: nothing is deferred. A
# module global, not a thread-local: on a GPU autograd runs backward functions on its own device
# threads, while the executor's thread waits in backward.
_queue: list | None = None
# True inside `deferred_forward()`: linear() takes the native way (see the module's doc).
_native = False
# The inputs the native way holds for W, by id: autograd does not save them (the detached weight
# needs no input to its gradient), so they are counted here (`held_inputs`) and not as saved tensors.
_inputs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

Accumulate = Callable[[nn.Parameter, torch.Tensor], None]


def accumulate_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
    """Add `grad` into `p.grad` as AccumulateGrad does: the first gradient is kept, later ones added.

    For gradients that record no graph, as W's (`WeightGradStore.run` computes them under no_grad).
    """
    if p.grad is None:
        p.grad = grad
    else:
        p.grad.add_(grad)  # in place, as AccumulateGrad adds (no .grad setter: W runs per layer)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    # autocast casts floating tensors other than float64 (its "eligible" rule); so do we.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _weight_grads(x: torch.Tensor, grad_out: torch.Tensor, want_weight: bool, want_bias: bool):
    """The weight and bias gradients of y = x W^T + b, as autograd computes them for F.linear.

    F.linear runs a contiguous input as one matrix product on its rows (addmm, or mm without a
    bias); the product's backward, for the transposed weight it multiplies by, is
    grad_out^T @ x, and the bias's is grad_out summed over the rows.
    """
    g = grad_out.reshape(-1, grad_out.size(-1))
    gw = g.t().mm(x.reshape(-1, x.size(-1))) if want_weight else None
    gb = g.sum(0) if want_bias else None
    return gw, gb


def _cast_linear(x, weight, bias, dtype):
    """(input, weight, output) of F.linear as autocast to `dtype` runs it (None: no autocast): the
    operands cast as autocast casts them, the product run with autocast off."""
    if dtype is None:  # the usual case, kept short: this runs per layer and per micro-batch
        return x, weight, F.linear(x, weight, bias)
    xc, wc, bc = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return xc, wc, F.linear(xc, wc, bc)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc, out = _cast_linear(x, weight, bias, dtype)
        ctx.save_for_backward(xc, wc)
        ctx.x_dtype = x.dtype
        # The leaf parameters themselves, where W adds the gradients (not their autocast copies).
        ctx.params = (weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad_out.reshape(-1, grad_out.size(-1))
            grad_x = g.mm(w).view(*grad_out.shape[:-1], w.size(1)).to(ctx.x_dtype)
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        if _queue is not None:
            # W needs only the input and the output gradient: the rest of the graph can go.
            _queue.append((weight if want_w else None, bias if want_b else None, x, grad_out))
            return grad_x, None, None, None
        gw, gb = _weight_grads(x, grad_out, want_w, want_b)
        return (grad_x, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None)


@contextlib.contextmanager
def deferred_forward(on: bool = True):
    """Inside, deferred linear layers build outputs whose backward queues their weight gradients:
    that backward must run inside a `WeightGradStore.deferring` (an I), or it raises. (`on=False`:
    inside, they take the function's way; plait.checkpointing recomputes with the forward's way.)"""
    global _native
    outer, _native = _native, on
    try:
        yield
    finally:
        _native = outer


def native_forward() -> bool:
    """Whether a forward now runs inside `deferred_forward()`."""
    return _native


def held_inputs() -> list[torch.Tensor]:
    """The layer inputs that forwards inside `deferred_forward()` hold for W, still alive."""
    return list(_inputs.values())


def _queue_pair(weight, bias, x, grad_out):
    # A tensor hook on the layer's output: autograd calls it with the output's whole gradient,
    # just before the layer's own backward node runs, where the function's backward would be.
    if _queue is None:
        raise RuntimeError("a linear layer's forward ran inside deferred_forward() but its backward "
                           "runs outside a WeightGradStore's deferring(): its weight gradient would be lost")
    _queue.append((weight, bias, x, grad_out))


def _native_linear(x, weight, bias, dtype):
    # The function's forward, with the weight and bias detached: autograd records the input's
    # path alone, and the same products run.
    xc, _, out = _cast_linear(x, weight.detach(), bias.detach() if bias is not None else None, dtype)
    want_b = bias is not None and bias.requires_grad
    out.register_hook(functools.partial(_queue_pair, weight, bias if want_b else None, xc))
    _inputs[id(xc)] = xc
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` whose weight and bias gradients W can take (see the module's doc).

    Where nothing can be deferred -- no gradient is recorded, or the weight (or bias) is not a
    leaf tensor, whose gradient must flow on through autograd -- it is F.linear itself.
    """
    leaf = weight.is_leaf and weight.requires_grad and (bias is None or bias.is_leaf)
    if not (torch.is_grad_enabled() and leaf):
        return F.linear(x, weight, bias)
    if _native and x.requires_grad:  # (an input without a gradient leaves no node to hook: the function)
        return _native_linear(x, weight, bias, _autocast_dtype(x.device.type))
    return _Linear.apply(x, weight, bias, _autocast_dtype(x.device.type))


def _deferred_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return linear(input, module.weight, module.bias)


def _unchecked_modules(root: nn.Module):
    """`root` and its submodules, leaving out every checkpointed module and what is inside it."""
    from plait import checkpointing

    if checkpointing.mode_of(root) != "none":
        return
    yield root
    for child in root.children():
        yield from _unchecked_modules(child)


def defer_linears(modules: Iterable[nn.Module]) -> int:
    """Make every `nn.Linear` inside `modules` run `linear`; returns how many it changed.

    Only the instance's `forward` is replaced: parameters, names and tied weights stay as they
    are. Idempotent; with no store deferring, the new forward gives the same values and
    gradients as the old.

    [Note: checkpointing and the split] A module checkpointed by plait.checkpointing (a whole
    layer, or a Linear itself) is left as it is, and so is everything inside it: its backward
    recomputes the forward and runs whole in I. Deferring there would keep each recomputed
    matmul's input and output gradient until W, about as much as the layer saves without
    checkpointing (16 of a GPT block's widths against checkpointing's 1), and a zero-bubble
    schedule holds up to pp micro-batches between I and W: the peak would exceed 1F1B's with
    checkpointing by far. Left whole, a checkpointed layer costs what it costs under 1F1B,
    and W keeps the layers outside (the embedding and the LM head by default).
    """
    changed = 0
    for root in modules:
        for m in _unchecked_modules(root):
            if type(m) is not nn.Linear or m.__dict__.get("_plait_deferred"):
                continue
            m.forward = functools.partial(_deferred_forward, m)
            m._plait_deferred = True
            changed += 1
    return changed


class WeightGradStore:
    """Deferred weight-gradient work, queued per key (the executor's (stage, micro-batch)).

    Args:
        accumulate: `accumulate(param, grad)` adds a W gradient where AccumulateGrad would have
            put it; by default into `.grad` (`accumulate_grad`). The Engine points it at its
            GradientSync under data parallelism.
    """

    def __init__(self, accumulate: Accumulate | None = None):
        self.accumulate = accumulate or accumulate_grad
        self._queues: dict[Hashable, list] = {}

    @contextlib.contextmanager
    def deferring(self, key: Hashable):
        """Inside, the backward of `linear` queues its weight gradients under `key` (the I action)."""
        global _queue
        outer, _queue = _queue, self._queues.setdefault(key, [])
        try:
            yield
        finally:
            _queue = outer

    def pending(self) -> list[Hashable]:
        """Keys whose weight gradients are queued and not yet run (holding their activations)."""
        return [k for k, q in self._queues.items() if q]

    def held(self) -> list[torch.Tensor]:
        """What the queues hold for W: each deferred use's layer input and output gradient (for a
        count of activation memory; an input may also be a tensor autograd saves)."""
        return [t for queue in self._queues.values() for item in queue for t in item[2:]]

    def clear(self) -> None:
        """Drop every queued piece of work (and the activations it holds), run or not."""
        self._queues.clear()

    def run(self, key: Hashable) -> None:
        """The W action: compute `key`'s queued weight gradients and accumulate them, freeing each
        queued (input, output gradient) pair as it goes.

        A parameter queued several times (a weight used at several places) gets its gradients
        summed in queue order, the order autograd's backward met them and would have summed
        them, and accumulated once, when its last one is in.
        """
        queue = self._queues.pop(key, [])
        left: dict[nn.Parameter, int] = {}
        for weight, bias, _, _ in queue:
            for p in (weight, bias):
                if p is not None:
                    left[p] = left.get(p, 0) + 1
        sums: dict[nn.Parameter, torch.Tensor] = {}
        queue.reverse()  # popped from the end: first queued, first run
        with torch.no_grad():
            while queue:
                weight, bias, x, grad_out = queue.pop()
                gw, gb = _weight_grads(x, grad_out, weight is not None, bias is not None)
                del x, grad_out
                for p, g in ((weight, gw), (bias, gb)):
                    if p is None:
                        continue
                    if g.dtype != p.dtype:
                        g = g.to(p.dtype)
                    sums[p] = g if p not in sums else sums[p].add_(g)
                    left[p] -= 1
                    if left[p] == 0:
                        self.accumulate(p, sums.pop(p))
