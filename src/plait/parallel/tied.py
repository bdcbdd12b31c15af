"""Weights shared by layers on different pipeline ranks (GPT-2's tied embedding and LM head).

See [Note: tied embeddings] in model/gpt.py. In one process the embedding and
the LM head hold one Parameter, whose gradient autograd sums. Cut into a
pipeline, the first and last stage each hold a copy. Both copies start equal
(they are built from one object); after every backward their gradients are
summed over the ranks that hold them, so both copies take the same optimizer
step and stay equal, as in Megatron-LM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.schedule import stage_rank
from plait.watchdog import wait


def find_tied(layers: list[nn.Module], layer_stage: list[int], pp: int,
              layout: str = "loop") -> list[tuple[nn.Parameter, tuple[int, ...]]]:
    """Parameters held by layers on more than one pipeline rank, with those ranks (sorted).

    Every rank gets the same list in the same order: it is computed from the
    whole layer list, which every rank builds identically. `layout` places the
    stages (parallel/schedule.py); under zbv's V the first and last stage share
    rank 0, so GPT-2's tied weight is tied within one rank and not listed.
    """
    holders: dict[nn.Parameter, set[int]] = {}
    order: list[nn.Parameter] = []
    for j, layer in enumerate(layers):
        for p in layer.parameters():
            if p not in holders:
                holders[p] = set()
                order.append(p)
            holders[p].add(stage_rank(layer_stage[j], pp, layout))
    return [(p, tuple(sorted(holders[p]))) for p in order if len(holders[p]) > 1]


class TiedGradients:
    """Sums the gradients of cross-rank tied parameters over the ranks that hold them.

    `pp_by_replica[d]` lists the global ranks of data-parallel replica d's
    pipeline, in pp order (the columns of the mesh). Every rank creates every
    group, as `dist.new_group` requires, but joins only its own.
    """

    def __init__(self, tied: list[tuple[nn.Parameter, tuple[int, ...]]], local: set[nn.Parameter],
                 pp_by_replica: list[list[int]]):
        me = dist.get_rank()
        self.pairs: list[tuple[nn.Parameter, dist.ProcessGroup]] = []
        self.owned_elsewhere: set[nn.Parameter] = set()  # counted by a lower rank in the global norm
        for p, pp_ranks in tied:
            for column in pp_by_replica:
                members = [column[r] for r in pp_ranks]
                group = dist.new_group(members)
                if me in members and p in local:
                    self.pairs.append((p, group))
                    if me != members[0]:
                        self.owned_elsewhere.add(p)

    @property
    def params(self) -> set[nn.Parameter]:
        """This rank's tied copies."""
        return {p for p, _ in self.pairs}

    def sync(self, describe=lambda r: f"rank {r}", grad_of=None) -> None:
        """After backward (and after the data-parallel reduction): sum each tied gradient.

        `grad_of(p)` gives the tensor to sum in place; by default `p.grad` (ZeRO passes the
        shard of the bucket holding p, cut alike on every holder). All sums are launched
        before the first is waited on; each result is read only after its own Work is
        waited on (on NCCL, that orders it before the norm and the optimizer).
        """
        works = []
        for p, group in self.pairs:
            if grad_of is not None:
                grad = grad_of(p)
            else:
                if p.grad is None:  # this copy took no part: it still contributes zero
                    p.grad = torch.zeros_like(p)
                grad = p.grad
            works.append((dist.all_reduce(grad, group=group, async_op=True), group))
        me = describe(dist.get_rank())
        for work, group in works:
            peers = ", ".join(describe(r) for r in dist.get_process_group_ranks(group))
            wait(work, lambda s, peers=peers: f"{me} waited {s:.0f} s in the tied-weight all-reduce with {peers}")
