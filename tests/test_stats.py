"""Intervals and paired tests of Table 3 against values worked out by hand (and scipy as a second opinion)."""

import numpy as np
import pytest
from scipy import stats as sp

from pipeline.evaluate.stats import compare, holm, mcnemar_exact, paired_bootstrap_interval, wilson_interval


def test_wilson_interval_known_values():
    # 0 errors in 10: (0, z^2 / (n + z^2)) = (0, 3.8415 / 13.8415)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    # 5 of 10: symmetric around 1/2, half-width z / (1 + z^2/n) * sqrt(1/40 + z^2/400)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    # 300 of 1000 (30%): about +-2.8 points
    lo, hi = wilson_interval(300, 1000)
    assert (lo, hi) == (pytest.approx(0.27241, abs=1e-5), pytest.approx(0.32912, abs=1e-5))
    ci = sp.binomtest(300, 1000).proportion_ci(method="wilson")
    assert (lo, hi) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 6) == 2 / 64  # all six discordant images favour B: 2 * (1/2)^6
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    for b, c in [(3, 17), (40, 61), (200, 260)]:
        assert mcnemar_exact(b, c) == pytest.approx(sp.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert 0 < mcnemar_exact(2000, 2300) < 1e-5  # big counts stay exact (integers, no underflow)


def test_holm_adjustment():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04); original order kept
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_paired_bootstrap_interval():
    assert paired_bootstrap_interval(0, 0, 100) == (0.0, 0.0)  # no discordant image: no difference at all
    assert paired_bootstrap_interval(100, 0, 100) == (1.0, 1.0)
    lo, hi = paired_bootstrap_interval(30, 30, 1000)
    assert lo < 0 < hi and lo == pytest.approx(-hi, abs=0.005)
    # 60 vs 20 discordant in 1000: difference 4 points, sd sqrt((b + c) / n^2 - d^2 / n) ~ 0.0087
    lo, hi = paired_bootstrap_interval(60, 20, 1000)
    assert lo == pytest.approx(0.04 - 1.96 * 0.0087, abs=0.003) and hi == pytest.approx(0.04 + 1.96 * 0.0087, abs=0.003)


def test_compare_counts_discordant_images():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 0], dtype=bool)  # A wrong on images 0, 1, 2, 5
    b = np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)  # B wrong on images 0, 7
    c = compare(a, b)
    assert (c["n"], c["only_a_wrong"], c["only_b_wrong"]) == (8, 3, 1)
    assert c["err_a"] == 0.5 and c["err_b"] == 0.25 and c["diff"] == 0.25
    assert c["p_mcnemar"] == 2 * (1 + 4) / 16  # min(3, 1) = 1 of 4 discordant
    with pytest.raises(ValueError):
        compare(a, b[:4])
