"""Learning-rate schedule: linear warm-up, then cosine or linear decay to ``min_lr``.

A pure function of the optimizer step, so a resumed run needs no scheduler state: the
step alone gives the rate.

    step s (1-based, the step being taken), warm-up W, total N, peak lr, floor m:
      s <= W:        lr = lr_peak * s / W
      W < s <= N:    p = (s - W) / (N - W)
                     cosine: lr = m + (lr_peak - m) * (1 + cos(pi * p)) / 2
                     linear: lr = m + (lr_peak - m) * (1 - p)
                     constant: lr = lr_peak
      s > N:         lr = m (cosine, linear) or lr_peak (constant)
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          decay: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (1-based); see the module docstring."""
    if step < 1:
        raise ValueError(f"step = {step}: steps are counted from 1")
    if decay not in SCHEDULES:
        raise ValueError(f"optim.decay = {decay!r}: must be one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if decay == "constant":
        return lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if decay == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
