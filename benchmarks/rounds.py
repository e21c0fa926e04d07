"""Interleaved rounds for the benchmarks: each candidate runs once per round, in turn (A B, A B, ...), so a
machine that speeds up or slows down during the run (other load, thermal limits, a cold page cache)
affects both alike; figures are medians over rounds with their range, ratios the median of the
per-round ratios."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int, log=print) -> dict[str, list[float]]:
    """Call every candidate (returning its figure, e.g. images/s) once per round, in turn."""
    out: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, fn in candidates.items():
            out[name].append(fn())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:,.1f}" for n, v in out.items()))
    return out


def spread(values: list[float]) -> str:
    """'median [min-max]' of a figure's rounds."""
    return f"{statistics.median(values):,.1f} [{min(values):,.1f}-{max(values):,.1f}]"


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The median, min and max over rounds of a[i] / b[i] (the rounds pair the two)."""
    rs = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(rs), min(rs), max(rs)


def ratio_line(name: str, a: list[float], b: list[float], target: float) -> str:
    med, lo, hi = ratio(a, b)
    verdict = "meets" if med >= target else "BELOW"
    return f"{name}: {med:.2f} [{lo:.2f}-{hi:.2f}] over {len(a)} rounds ({verdict} the target >= {target:.2f})"
