"""The learning-rate schedule, and what resuming a run with another --steps does to it.

Warm-up, then a cosine down to the floor (min_lr_ratio x lr) at the last step.
The cosine's position is its progress, 0 at the end of warm-up and 1 at the
last step. A run resumed with a different --steps re-plans only what is left:
from the step it resumes at, the progress goes on from where it was and
reaches 1 at the new last step. So the rate never jumps: a run stopped half-way
down its cosine and given more steps decays more slowly from its current rate;
a finished run (already at the floor) that is extended trains on at the floor.
Each checkpoint records the plan it was trained under (`plan_of`), so the
re-planning composes over several extensions.
"""

from __future__ import annotations

import math

from plait.config import Config

Anchor = tuple[int, float]  # (update step, cosine progress there): where the cosine's remaining part starts


def progress(step: int, steps: int, anchor: Anchor) -> float:
    """The cosine's progress (0..1) at update `step` of a run of `steps` anchored at `anchor`."""
    start, at = anchor
    return at + (1.0 - at) * min(max(step - start, 0) / max(1, steps - start), 1.0)


def lr_at(step: int, cfg: Config, anchor: Anchor | None = None) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine down to min_lr_ratio x lr.

    `anchor` is None for a run trained under one --steps: the cosine runs from
    the end of warm-up to the last step. A run resumed with another --steps
    passes the anchor `replan` gives: what is left of the cosine is stretched
    (or squeezed) from the resumed step to the new last step, starting at the
    rate the old plan had there, so the rate is continuous; an extended
    finished run stays at the floor.
    """
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.lr * t.min_lr_ratio
    p = progress(step, t.steps, anchor or (t.warmup_steps, 0.0))
    return floor + 0.5 * (1.0 + math.cos(math.pi * p)) * (t.lr - floor)


def plan_of(cfg: Config, anchor: Anchor | None) -> dict:
    """The schedule a checkpoint records: the run's --steps and its anchor (plain numbers for torch.load)."""
    start, at = anchor or (cfg.train.warmup_steps, 0.0)
    return {"steps": cfg.train.steps, "anchor_step": start, "anchor_progress": at}


def replan(saved: dict | None, resumed_at: int, cfg: Config) -> Anchor | None:
    """The anchor for a run resumed at update `resumed_at` from a checkpoint that recorded the plan `saved`.

    The same --steps keeps the saved plan. Another --steps anchors the rest
    of the cosine at the resumed step (or at the end of warm-up, if that is
    later), at the progress the saved plan had reached there. A checkpoint
    from before plans were recorded (`saved` None) is taken to share this
    run's --steps.
    """
    if saved is None:
        return None
    old: Anchor = (saved["anchor_step"], saved["anchor_progress"])
    if saved["steps"] == cfg.train.steps:
        return None if old == (cfg.train.warmup_steps, 0.0) else old
    start = max(resumed_at, cfg.train.warmup_steps)
    return start, progress(start, saved["steps"], old)
