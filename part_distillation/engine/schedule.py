"""Learning rate as a pure function of the iteration (no scheduler state to drift on resume).

The reference schedule (detectron2 ``WarmupMultiStepLR`` with Mask2Former's settings):
the base rate multiplied by ``gamma`` (0.1) once for every step already reached, with an
optional linear warm-up from ``warmup_factor * base`` over the first ``warmup_iters``
iterations (reference: no warm-up).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MultiStepSchedule:
    """``lr(iteration)`` for iteration 0, 1, ... (the iteration about to be run)."""

    base_lr: float
    steps: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"lr steps must be increasing, got {list(self.steps)}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")

    def __call__(self, iteration: int) -> float:
        # bisect_right: at iteration == step the decay has already happened (detectron2 semantics)
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr
