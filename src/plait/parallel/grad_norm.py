"""The gradient norm and its clipping, a few kernels for all of a rank's gradients.

[Note: grouped norm] One `torch._foreach_norm` per (device, dtype) group, as
`torch.nn.utils.clip_grad_norm_` does, and one `_foreach_mul_` to clip. The
first version took each gradient's norm in float64 on its own: a float64 copy
and four small kernels per parameter, launched after the backward while the GPU
waited for them. On an H200 (gpt2-124m, 148 parameters, bfloat16) that was 926
launches more than a plain PyTorch loop per step and 7 ms of a 50 ms step
(`benchmarks/gpu.py --profile`). Each tensor's norm is now taken in its own
dtype (float32 at least; float64 in the float64 equivalence tests), and the
squares are summed in float64 as before.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch


def _groups(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors by (device, dtype), as the foreach kernels take them."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return list(groups.values())


def squared_norm(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the tensors' squared L2 norms, a float64 0-d tensor on `device` (0 for none)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in _groups(tensors):
        if group[0].dtype.itemsize < 4:  # a bfloat16 norm keeps 3 digits: upcast (params are rarely bfloat16)
            group = [t.float() for t in group]
        norms = torch.stack(torch._foreach_norm(group, 2.0)).to(torch.float64)
        total = total + norms.square().sum()
    return total


def scale_(tensors: Iterable[torch.Tensor], scale: torch.Tensor) -> None:
    """Multiply every tensor in place by the 0-d tensor `scale` (stays on the device)."""
    for group in _groups(tensors):
        torch._foreach_mul_(group, scale.to(group[0].dtype))
