"""Fitting the accuracy run (benchmarks/gpu/accuracy.py) to a time budget (--budget-s), as pure functions.

Nothing here knows a GPU's speed: every figure comes from measurements taken on the machine during the
run (the first epoch(s) of the replicas, two short evaluation passes), and the planned run is the
longest that those figures say fits. The run's length is chosen after its first epoch(s), so those
epochs' learning rates must not depend on it (`calibration_epochs`).
"""

from __future__ import annotations

import math


class BudgetError(ValueError):
    pass


def calibration_epochs(shape: str, warmup_epochs: float) -> int:
    """How many epochs train before the number of epochs is chosen.

    "step" (the paper's x0.96 every N epochs) never reads the run's length: one epoch. "cosine" anneals to
    0 at the last epoch, so only its linear warm-up is independent of the length: the calibration is the
    warm-up, which must then be a whole number of epochs (>= 1)."""
    if shape == "step":
        return 1
    if shape == "cosine":
        if warmup_epochs < 1 or warmup_epochs != int(warmup_epochs):
            raise BudgetError(f"schedule.warmup_epochs={warmup_epochs}: a cosine schedule whose length is chosen "
                              "after measuring needs a whole number (>= 1) of warm-up epochs to measure in "
                              "(their learning rates do not depend on the length)")
        return int(warmup_epochs)
    raise BudgetError(f"schedule.shape {shape!r}: expected step or cosine")


def eval_estimate(n1: int, t1: float, n2: int, t2: float, n_total: int, safety: float = 1.15) -> dict:
    """Seconds to evaluate `n_total` images from two timed passes over n1 < n2 images: a fixed start-up
    cost (pipeline build, first batches) plus a per-image cost (the slope), times `safety`. The slope is
    kept at >= 1/4 of the n2 pass's mean cost per image, so timing noise cannot make it ~0."""
    if not 0 < n1 < n2 or t1 <= 0 or t2 <= 0 or n_total < 1:
        raise BudgetError(f"evaluation timing needs 0 < n1 < n2 and positive times, got ({n1}, {t1}), ({n2}, {t2})")
    per_image = max((t2 - t1) / (n2 - n1), 0.25 * t2 / n2)
    startup = max(0.0, t2 - per_image * n2)
    return {"startup_s": startup, "per_image_s": per_image, "images": n_total, "safety": safety,
            "seconds": safety * (startup + per_image * n_total)}


def fit_epochs(budget_s: float, elapsed_s: float, eval_s: float, reserve_s: float, calib: list[dict],
               replicas: int, concurrent: int, calib_epochs: int, max_epochs: int) -> dict:
    """The most epochs (between calib_epochs and max_epochs) for which training and evaluation end
    within the budget, with the replicas of the first wave already through their calibration epochs.

    `calib`: one dict per first-wave replica, measured under the same concurrency: `startup_s` (process
    start to training call), `overhead_s` (one training call's time outside its epochs: loaders, model,
    checkpoints) and `epoch_s` (one epoch, its validation included). The slowest of each is used. With
    W = ceil(replicas / concurrent) waves, training still needs, for E epochs:
        first wave:   overhead + (E - calib_epochs) * epoch        (0 when E == calib_epochs)
        later waves:  (W - 1) * (startup + overhead + E * epoch)
    """
    if budget_s <= 0 or replicas < 1 or concurrent < 1 or calib_epochs < 1 or max_epochs < calib_epochs:
        raise BudgetError("need budget_s > 0, replicas >= 1, concurrent >= 1, 1 <= calib_epochs <= max_epochs")
    if not calib:
        raise BudgetError("no replica finished its calibration epoch(s): nothing to measure the speed from")
    epoch = max(c["epoch_s"] for c in calib)
    overhead = max(c["overhead_s"] for c in calib)
    startup = max(c["startup_s"] for c in calib)
    if epoch <= 0:
        raise BudgetError(f"measured epoch time {epoch} s is not positive")
    waves = math.ceil(replicas / min(concurrent, replicas))

    def remaining(e: int) -> float:
        first = 0.0 if e == calib_epochs else overhead + (e - calib_epochs) * epoch
        return first + (waves - 1) * (startup + overhead + e * epoch)

    available = budget_s - elapsed_s - eval_s - reserve_s
    # remaining(e) is linear in e above calib_epochs: solve remaining(e) <= available, then check.
    e = math.floor((available - overhead + calib_epochs * epoch - (waves - 1) * (startup + overhead))
                   / (waves * epoch))
    e = max(calib_epochs, min(max_epochs, e))
    while e > calib_epochs and remaining(e) > available:  # guards rounding at the boundary
        e -= 1
    predicted = remaining(e)
    return {"epochs": e, "waves": waves, "epoch_s": epoch, "overhead_s": overhead, "startup_s": startup,
            "available_train_s": available, "predicted_train_s": predicted,
            "predicted_end_s": elapsed_s + predicted + eval_s + reserve_s, "fits": predicted <= available,
            "capped": e == max_epochs}
