"""The Engine: one training step of a layer list, whatever the layout.

A step takes this rank's share of the global batch, splits it into
`microbatches` equal micro-batches, runs forward and backward on each, and
leaves in every parameter's `.grad` exactly the gradient of the mean loss over
the whole global batch, as one process running
`loss_fn(nn.Sequential(*layers)(x), y).backward()` would.

This module composes the parallel pieces on a mesh: with a "dp" axis of more
than one rank, gradients are summed over the replicas by `GradientSync`
while backward runs. With no mesh (one process) a step is plain gradient
accumulation over the micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.data_parallel import GradientSync

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Engine:
    """Runs training and evaluation steps of `layers` on a device mesh.

    Args:
        layers: the model as an ordered list of modules (or an nn.Sequential).
        loss_fn: `loss_fn(output, targets)`, a mean over the micro-batch.
        mesh: the DeviceMesh to run on; None for one process.
        schedule: the pipeline schedule ("gpipe", "1f1b", "interleaved-1f1b").
        microbatches: micro-batches per step on this rank; with one pipeline
            stage this is gradient accumulation.
        autocast_dtype: run forward passes under `torch.autocast` in this
            dtype (e.g. torch.bfloat16); None for the parameters' own dtype.
        bucket_mb: gradient bucket size in MiB for the data-parallel all-reduce.
    """

    def __init__(self, layers: list[nn.Module] | nn.Sequential, loss_fn: LossFn, mesh=None, *,
                 schedule: str = "1f1b", microbatches: int = 1,
                 autocast_dtype: torch.dtype | None = None, bucket_mb: float = 25.0):
        self.layers = list(layers)
        self.module = nn.Sequential(*self.layers)
        self.loss_fn = loss_fn
        self.mesh = mesh
        self.schedule = schedule
        self.num_microbatches = microbatches
        self.autocast_dtype = autocast_dtype
        self.dp_size = mesh["dp"].size() if mesh is not None else 1
        self.pp_size = mesh["pp"].size() if mesh is not None else 1
        if self.pp_size > 1:
            raise NotImplementedError("pipeline stages (pp > 1) are not built yet")
        self.dp_group = mesh.get_group("dp") if self.dp_size > 1 else None
        self.grad_sync = None
        if self.dp_group is not None:
            self.grad_sync = GradientSync(list(self.module.parameters()), self.dp_group,
                                          bucket_bytes=int(bucket_mb * 2**20))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.module.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _split(self, inputs: torch.Tensor, targets: torch.Tensor):
        m = self.num_microbatches
        if inputs.size(0) % m:
            raise ValueError(f"a batch of {inputs.size(0)} rows does not split into {m} micro-batches")
        return zip(inputs.chunk(m), targets.chunk(m))

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward over this rank's share; returns the global mean loss.

        Gradients are accumulated into `.grad` (call the optimizer's
        zero_grad between steps, as usual).
        """
        self.module.train()
        m, sync = self.num_microbatches, self.grad_sync
        if sync is not None:
            sync.prepare()
        total = torch.zeros((), device=inputs.device, dtype=torch.float64)
        for i, (x, y) in enumerate(self._split(inputs, targets)):
            if sync is not None:
                sync.sync = i == m - 1  # accumulate locally; send once, during the last backward
            with self._autocast():
                loss = self.loss_fn(self.module(x), y)
            # Equal micro-batches and equal shares: the mean over the global batch is
            # the sum over ranks and micro-batches of loss / (m * dp).
            (loss / (m * self.dp_size)).backward()
            total += loss.detach().double()
        if sync is not None:
            sync.finish()
        return self._global_mean(total / m)

    def _global_mean(self, local: torch.Tensor) -> float:
        """The mean of a per-rank mean over the data-parallel replicas."""
        if self.dp_group is not None:
            local = local.clone()
            dist.all_reduce(local, group=self.dp_group)
            local /= self.dp_size
        return local.item()

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean loss over this rank's share, forward only."""
        self.module.eval()
        total = torch.zeros((), device=inputs.device, dtype=torch.float64)
        for x, y in self._split(inputs, targets):
            with self._autocast():
                total += self.loss_fn(self.module(x), y).double()
        return self._global_mean(total / self.num_microbatches)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients by their global norm over all ranks; returns the norm before clipping.

        With max_norm <= 0 nothing is clipped and the norm is still returned.
        Replicas hold identical gradients after a step, so the local norm is
        the global one.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm.item()

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (a tied weight once), for any torch.optim optimizer."""
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters with their `nn.Sequential(*layers)` names."""
        return self.module.named_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the model, keyed as in `nn.Sequential(*layers).state_dict()`."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this rank's part (keys as in `state_dict`)."""
        self.module.load_state_dict(state)
