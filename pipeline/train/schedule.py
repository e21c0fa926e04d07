"""The math of the training recipe as pure functions: learning rate schedule and Polyak averaging."""

from __future__ import annotations

import math

import torch
from torch import nn

SHAPES = ("step", "cosine")


def lr_at(epoch: float, base_lr: float, decay: float = 0.96, every: int = 8, warmup_epochs: float = 0,
          shape: str = "step", total_epochs: float | None = None) -> float:
    """Learning rate at a (fractional) epoch.

    shape "step" (the paper, sec. 6): a fixed schedule "decreasing the learning rate by 4% every 8
    epochs", i.e. base * decay ** floor(epoch / every).
    shape "cosine" (short runs, e.g. the CPU demo): half a cosine from base to 0 at `total_epochs`
    (Loshchilov & Hutter, 2017); with the warm-up below this is the usual one-cycle shape.
    With `warmup_epochs`, the rate first rises linearly from base/10 to base over those epochs
    (large-batch training; Goyal et al., 2017).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {SHAPES}, not {shape!r}")
    if warmup_epochs and epoch < warmup_epochs:
        return base_lr * (0.1 + 0.9 * epoch / warmup_epochs)
    if shape == "cosine":
        if not total_epochs or total_epochs <= warmup_epochs:
            raise ValueError("the cosine schedule needs total_epochs > warmup_epochs")
        t = min(1.0, (epoch - warmup_epochs) / (total_epochs - warmup_epochs))
        return base_lr * 0.5 * (1 + math.cos(math.pi * t))
    return base_lr * decay ** int(epoch // every)


class PolyakAverage:
    """Exponential moving average of a model's parameters and buffers (the paper's Polyak averaging,
    sec. 6, "used to create the final model used at inference time").

    After each optimiser step: avg <- d * avg + (1 - d) * current for floating tensors, where
    d = decay, or with `warmup` d = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    ExponentialMovingAverage num_updates rule), so that short runs are not dominated by the random
    initialisation. Integer buffers (BatchNorm's num_batches_tracked) are copied.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step for all tensors at once: `torch._foreach_lerp_` over the floating tensors (one fused
        launch per dtype/device group instead of two kernels per tensor: 364 tensors for `bn`),
        `_foreach_copy_` for the integer buffers."""
        d = self.current_decay()
        floats_avg, floats_cur, ints_avg, ints_cur = [], [], [], []
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                floats_avg.append(avg)
                floats_cur.append(v.detach())
            else:
                ints_avg.append(avg)
                ints_cur.append(v.detach())
        if floats_avg:  # avg + (1 - d) (cur - avg) = d avg + (1 - d) cur
            torch._foreach_lerp_(floats_avg, floats_cur, 1 - d)
        if ints_avg:
            torch._foreach_copy_(ints_avg, ints_cur)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.decay, self.updates = d["decay"], d["updates"]
        for k, v in d["state"].items():
            self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)
