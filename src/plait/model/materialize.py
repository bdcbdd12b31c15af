"""Meta-device layers -> real tensors, for the layers this rank holds only.

A model too large for one device is built on the meta device (shapes, no
memory); each pipeline rank then gives real memory to its own layers and
initialises them with an initialiser `init(index, layer, device)`. The other
layers stay on the meta device and are never touched, so no rank ever holds the
whole model. For exactness the initialiser must give layer `index` the same
values whichever layers exist beside it (`gpt_init` seeds each GPT layer by its
index, as `build_gpt` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from plait.model.gpt import GPTConfig, init_gpt_layer

Init = Callable[[int, nn.Module, torch.device], None]


def is_meta(layer: nn.Module) -> bool:
    """Whether any parameter or buffer of `layer` is on the meta device."""
    return any(t.is_meta for t in (*layer.parameters(), *layer.buffers()))


def gpt_init(cfg: GPTConfig, seed: int = 0) -> Init:
    """The initialiser that gives each GPT layer the values `build_gpt(cfg, seed)` gives it."""

    def init(index: int, layer: nn.Module, device: torch.device) -> None:
        init_gpt_layer(index, layer, cfg, seed)

    return init


def materialize(layers: Sequence[nn.Module], indices: Iterable[int], init: Init,
                device: torch.device | str) -> dict[nn.Parameter, nn.Parameter]:
    """Give layers[j] for j in `indices` real memory on `device` and initialise them.

    Each such layer that is (partly) on the meta device is moved with `to_empty`
    and then handed to `init(j, layer, device)`, which must set every parameter and
    buffer. A layer already real is left as it is. Weights that several of these
    layers share (one Parameter object on the meta device, like the GPT's tied
    embedding and LM head on one rank) are shared again afterwards: `to_empty`
    gives each module its own copy, and the first holder's (initialised by the
    first holder's init) is kept. Layers not in `indices` are not touched.

    Returns {the old Parameter: the real one} for every parameter of these layers.
    """
    device = torch.device(device)
    indices = list(indices)
    before = {j: dict(layers[j].named_parameters(remove_duplicate=False)) for j in indices}
    for j in indices:
        if is_meta(layers[j]):
            layers[j].to_empty(device=device)
            init(j, layers[j], device)
    real: dict[nn.Parameter, nn.Parameter] = {}
    for j in indices:
        for name, old in before[j].items():
            mine = layers[j].get_parameter(name)
            if old in real and real[old] is not mine:  # a shared weight: point at the first copy
                owner, _, leaf = name.rpartition(".")
                setattr(layers[j].get_submodule(owner), leaf, real[old])
            else:
                real[old] = mine
    return real
