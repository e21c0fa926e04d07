"""Statistics for Table 3: intervals for error rates and paired tests between rows, as pure functions.

Every row of Table 3 is an error rate over the same n images, so:
- a row's uncertainty is a binomial proportion's: the Wilson score interval (Wilson, 1927), which
  keeps its coverage near 0% error, unlike the normal approximation;
- two rows are compared *paired*, image by image (both rows saw the same images): the exact McNemar
  test (a two-sided binomial test on the discordant images: b = images only row A gets wrong,
  c = only row B), and a 95% interval for the difference in error from a paired bootstrap over
  images. A per-image difference takes one of three values (-1, 0, +1), so resampling n images is a
  multinomial draw of the three counts: exact, and as cheap for 50,000 images as for 50.
- several comparisons at once are corrected with Holm's step-down method: the evaluation applies it
  once over all the comparisons of its table (top-1 and top-5 together), so the family-wise error of
  the whole table is 5%.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion errors / n (95% by default)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= errors <= n:
        raise ValueError(f"errors must be in [0, n={n}], got {errors}")
    p = errors / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under H0 each of the b + c discordant images is equally likely
    to be one of A's or one of B's errors, so min(b, c) ~ Binomial(b + c, 1/2); p = 2 P(X <= min(b, c)),
    capped at 1. Computed with integers (exact for any n)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def paired_bootstrap_interval(b: int, c: int, n: int, reps: int = 10000, seed: int = 0,
                              level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of err(A) - err(B) over a paired bootstrap of the n images, where b images
    are wrong only under A and c only under B (the other n - b - c contribute 0)."""
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c and b + c <= n > 0; got b={b}, c={c}, n={n}")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=reps)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): reject where adjusted < alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def compare(wrong_a: np.ndarray, wrong_b: np.ndarray, seed: int = 0) -> dict:
    """Paired comparison of two rows from per-image error indicators (same images, same order):
    error rates, their difference a - b with a bootstrap 95% interval, the discordant counts and the
    exact McNemar p-value."""
    a, b_ = np.asarray(wrong_a, dtype=bool), np.asarray(wrong_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d indicator arrays, got {a.shape} and {b_.shape}")
    n = a.size
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    lo, hi = paired_bootstrap_interval(only_a, only_b, n, seed=seed)
    return {"n": n, "err_a": float(a.mean()), "err_b": float(b_.mean()), "diff": (only_a - only_b) / n,
            "diff_lo": lo, "diff_hi": hi, "only_a_wrong": only_a, "only_b_wrong": only_b,
            "p_mcnemar": mcnemar_exact(only_a, only_b)}
