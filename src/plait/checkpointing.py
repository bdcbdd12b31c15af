"""Activation checkpointing: recompute a layer's activations in the backward instead of keeping them.

`apply(layers, mode)` replaces each layer's `forward` on the instance, not the module tree, so
parameter names and `state_dict` keys stay those of `nn.Sequential(*layers)` (torch's
`checkpoint_wrapper` would add a `_checkpoint_wrapped_module.` prefix to every key).

- "full": the layer keeps only its input; the backward reruns its whole forward.
- "selective": the outputs of `scaled_dot_product_attention` are kept (the expensive op, whose
  output is only B x T x C) and everything else is recomputed: the LayerNorms, the linear
  layers and GELU, which are cheap relative to the memory of their B x T x 4C outputs. Matrix
  products are recomputed, not kept: keeping them would keep nearly everything.
  Random ops are never kept (a kept op is not rerun, and would leave the generator behind for
  the dropout after it), so attention with dropout > 0 is recomputed too. On the CPU, attention
  with dropout runs as PyTorch's unfused math (no attention op to keep): there selective keeps
  nothing inside the block, as full.

Both use `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, which restores the RNG state
for the recomputation, so dropout masks are the same as in the forward.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def _dropout_p(op, args, kwargs) -> float:
    """The `dropout_p` argument of an attention op (0.0 if it has none)."""
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == "dropout_p":
            return kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value or 0.0)
    return 0.0


def _selective_policy(ctx, op, *args, **kwargs):
    """Keep the fused attention op's outputs unless it draws dropout; recompute everything else.

    A kept op is not rerun in the recomputation, so a random op kept would leave the generator
    behind and every later random op (dropout) would draw other masks: random ops, attention with
    dropout included, are always recomputed, in order, from the replayed RNG state.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if "scaled_dot_product" in str(op) and _dropout_p(op, args, kwargs) == 0.0:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    # torch.utils.checkpoint.create_selective_checkpoint_contexts is public from torch 2.4.
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def _checkpointed_forward(plain_forward, mode: str, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation, the pipeline's shape probe: nothing to keep
        return plain_forward(*args, **kwargs)
    from plait.parallel import weight_grad

    # A deferred linear layer inside the layer builds its output one way inside deferred_forward()
    # and another outside (weight_grad.py); the recomputation, which runs in the backward, must
    # take the way the forward took, or its saved tensors differ from the forward's.
    native = weight_grad.native_forward()

    def contexts():
        forward, recompute = _selective_contexts() if mode == "selective" else (
            contextlib.nullcontext(), contextlib.nullcontext())
        return forward, _both(recompute, weight_grad.deferred_forward(native))

    return checkpoint(plain_forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def checkpoint_layer(layer: nn.Module, mode: str) -> nn.Module:
    """Make `layer` recompute its activations in the backward (`mode` in MODES); returns the layer.

    Applying it again replaces the earlier mode; "none" restores the plain forward.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    plain = layer.__dict__.pop("_plait_plain_forward", None)
    if plain is not None:
        layer.__dict__.pop("forward", None)
    if mode == "none":
        return layer
    plain = layer.forward  # the class's forward, bound to this layer
    layer._plait_plain_forward = plain
    layer.forward = functools.partial(_checkpointed_forward, plain, mode)
    return layer


def mode_of(layer: nn.Module) -> str:
    """The checkpointing mode `checkpoint_layer` last gave `layer` ("none" if none)."""
    if "_plait_plain_forward" not in layer.__dict__:
        return "none"
    return layer.__dict__["forward"].args[1]  # the partial of _checkpointed_forward(plain, mode)


def apply(layers: Iterable[nn.Module], mode: str, *, types: tuple[type, ...] | None = None) -> list[nn.Module]:
    """Checkpoint `layers` in `mode`: those of class `types`, or all but the first and last.

    The default leaves out the first and last layers (for GPT, the embedding and the LM head),
    whose activations the pipeline and the loss need anyway.
    """
    layers = list(layers)
    chosen = [l for l in layers if isinstance(l, types)] if types is not None else layers[1:-1]
    for layer in chosen:
        checkpoint_layer(layer, mode)
    return layers
