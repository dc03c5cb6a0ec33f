"""Per-iteration learning-rate schedule: linear warmup, then half-cosine decay.

vctmae uses this shape in both trainers, evaluated every optimizer step:

    step < warmup:  lr = start + (peak - start) * step / warmup
    otherwise:      lr = end + (peak - end) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))

Pretraining: start 0, peak blr * effective_batch / 256, end 0, warmup 40 of 100 epochs —
the paper's public code does the same (mae_st's `lr_sched.adjust_learning_rate` at the
fractional epoch of every step, half-cosine from the end of warmup).
Finetuning: start 1e-8, peak 1e-5, end 1e-7, warmup 5 of 50 epochs — the public code's
values, but not its shape: it uses timm's CosineLRScheduler with `t_in_epochs=True`, so its
learning rate changes once per epoch (constant within one: epoch 0 at 1e-8, epochs 1–4
linear to 1e-5, epoch e >= 5 at 1e-7 + ½(1e-5 − 1e-7)(1 + cos(π e / 50)): the cosine counted
from epoch 0, not from the end of warmup). See docs/reference-code-notes.md §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class WarmupCosine:
    """Learning rate as a pure function of the optimizer step (0-based)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    start_lr: float = 0.0
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps else 1.0
        return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate: a Python float, or — for a capture-ready
    optimizer — written into its lr tensor in place (a fill, no device sync)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
