"""Optimizer state keyed by parameter name, so that a layout can load what any other saved.

torch's `optimizer.state_dict()` numbers parameters in the order the
optimizer was given them, which depends on how the layers were split. These
key each state by the parameter's name in the whole model
(`nn.Sequential(*layers)`), a tied copy by its first name.
"""

from __future__ import annotations

from typing import Any

import torch


def _param_groups(optimizer) -> list[list]:
    """The parameters the optimizer's state_dict is indexed by, group by group: a ZeRO
    ShardedOptimizer's are the full parameters (`full_param_groups`), not its shard pieces."""
    full = getattr(optimizer, "full_param_groups", None)
    return full if full is not None else [group["params"] for group in optimizer.param_groups]


def optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (a tied copy by its first name)."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in _param_groups(optimizer) for p in group]
    return {"state": {names[params[i]]: s for i, s in sd["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load name-keyed optimizer state into this rank's optimizer, whatever layout saved it."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    params = [p for group in _param_groups(optimizer) for p in group]
    state = {i: saved["state"][names[p]] for i, p in enumerate(params) if names[p] in saved["state"]}
    groups, index = [], 0
    for group, kept in zip(_param_groups(optimizer), saved["param_groups"]):
        groups.append({**kept, "params": list(range(index, index + len(group)))})
        index += len(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
