"""Optimizer state keyed by parameter name, so that a layout can load what any other saved.

torch's `optimizer.state_dict()` numbers parameters in the order the
optimizer was given them, which depends on how the layers were split. These
key each state by the parameter's name in the whole model
(`nn.Sequential(*layers)`), a tied copy by its first name.

A ZeRO optimizer (plait.parallel.zero) holds a slice of each parameter's
state on each dp rank; `optimizer_shard_by_name` takes that slice as it is,
with no collective, and a checkpoint stores each rank's in a file of its own.
Read back, a parameter's slices are a `SlicedState`: a ZeRO optimizer copies
the elements of its own slice out of them, whatever dp saved them; any other
optimizer takes the whole tensor (`SlicedState.whole`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SlicedState:
    """One parameter's optimizer state as ZeRO saved it: slices of the flattened state, one per dp rank.

    `parts` holds (begin, end, state): the state's tensors hold elements [begin, end) of the
    flattened parameter's state; its scalar entries (AdamW's "step") are the whole entry. The
    tensors may be views of mapped files: only the elements asked for are read.
    """

    shape: tuple[int, ...]
    parts: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)

    def slice(self, begin: int, end: int) -> dict[str, Any]:
        """The state of elements [begin, end) of the flattened parameter, copied out of the parts."""
        out: dict[str, Any] = {}
        covered = 0
        for lo, hi, state in self.parts:
            a, b = max(lo, begin), min(hi, end)
            if a >= b:
                continue
            covered += b - a
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if key not in out:
                        out[key] = torch.empty(end - begin, dtype=value.dtype)
                    out[key][a - begin:b - begin] = value[a - lo:b - lo]
                elif key not in out:
                    out[key] = value.clone() if torch.is_tensor(value) else value
        if covered != end - begin:  # the manifest's checksums make this a writer's bug, not a damaged file
            raise ValueError(f"the saved slices cover {covered} of elements [{begin}, {end}) of a parameter's state")
        return out

    def whole(self) -> dict[str, Any]:
        """The whole parameter's state, each tensor in the parameter's shape."""
        return {key: value.view(self.shape) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in self.slice(0, math.prod(self.shape)).items()}


def _param_groups(optimizer) -> list[list]:
    """The parameters the optimizer's state_dict is indexed by, group by group: a ZeRO
    ShardedOptimizer's are the full parameters (`full_param_groups`), not its shard pieces."""
    full = getattr(optimizer, "full_param_groups", None)
    return full if full is not None else [group["params"] for group in optimizer.param_groups]


def _names(engine) -> dict:
    return {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}


def _groups(state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]]


def optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (a tied copy by its first name).

    Under ZeRO this gathers the whole state to every dp rank (a collective); a checkpoint takes
    each rank's share instead (`optimizer_shard_by_name`).
    """
    names = _names(engine)
    sd = optimizer.state_dict()
    params = [p for group in _param_groups(optimizer) for p in group]
    return {"state": {names[params[i]]: s for i, s in sd["state"].items()}, "param_groups": _groups(sd)}


def optimizer_shard_by_name(engine, optimizer) -> dict[str, Any]:
    """A ZeRO optimizer's own slice of the state, name-keyed, with no collective.

    {"state": {name: state of its slice}, "slices": {name: [begin, end, *shape]}, "param_groups"}:
    elements [begin, end) of the flattened parameter, whose shape is `shape`. The tensors are
    the optimizer's own, not copies.
    """
    names = _names(engine)
    shard = optimizer.state_shard()
    return {"state": {names[p]: state for p, (_, _, state) in shard.items()},
            "slices": {names[p]: [begin, end, *p.shape] for p, (begin, end, _) in shard.items()},
            "param_groups": _groups(optimizer.optimizer.state_dict())}


def load_optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load name-keyed optimizer state into this rank's optimizer, whatever layout saved it.

    A `SlicedState` goes to a ZeRO optimizer as it is (each rank copies out its own slice);
    any other optimizer gets it whole.
    """
    names = _names(engine)
    params = [p for group in _param_groups(optimizer) for p in group]
    keeps_slices = hasattr(optimizer, "state_shard")
    state = {}
    for i, p in enumerate(params):
        s = saved["state"].get(names[p])
        if s is not None:
            state[i] = s.whole() if isinstance(s, SlicedState) and not keeps_slices else s
    groups, index = [], 0
    for group, kept in zip(_param_groups(optimizer), saved["param_groups"]):
        groups.append({**kept, "params": list(range(index, index + len(group)))})
        index += len(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
