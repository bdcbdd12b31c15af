"""Training batches as a pure function of (seed, step, share).

Any process computes its own share of any step with no coordination, and a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def batch_offsets(seed: int, step: int, global_batch: int, seq_len: int, num_tokens: int) -> np.ndarray:
    """Start offsets (int64, shape (global_batch,)) of the sequences of one step.

    Each lies in [0, num_tokens - seq_len - 1], so a window of seq_len + 1
    tokens fits. Drawn with replacement from PCG64 seeded by [seed, step],
    the same on every machine and process.
    """
    if num_tokens < seq_len + 1:
        raise ValueError(f"{num_tokens} tokens cannot hold one sequence of {seq_len} + 1")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    return rng.integers(0, num_tokens - seq_len, size=global_batch, dtype=np.int64)


def get_batch(tokens: np.ndarray, seed: int, step: int, global_batch: int, seq_len: int,
              share: int = 0, num_shares: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Share `share` of `num_shares` of the global batch of `step`, as (x, y).

    Both are torch.long of shape (global_batch // num_shares, seq_len), with
    y[i, t] the token after x[i, t]. Share k holds rows [k*b, (k+1)*b) of the
    global batch, so the shares in order concatenate to the global batch.
    """
    import torch  # here, not at the top: `plait prepare` imports this package and needs no torch

    if num_shares < 1 or global_batch % num_shares:
        raise ValueError(f"num_shares {num_shares} does not divide global_batch {global_batch}")
    if not 0 <= share < num_shares:
        raise ValueError(f"share {share} is out of range for num_shares {num_shares}")
    b = global_batch // num_shares
    offsets = batch_offsets(seed, step, global_batch, seq_len, len(tokens))[share * b:(share + 1) * b]
    windows = np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)]).astype(np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
