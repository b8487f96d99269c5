"""The protection study's tests (``interp.paired``) against computations written out here: the exact
McNemar p-value as a binomial sum, the Cochran-Mantel-Haenszel statistic from its formula, Holm's
step-down by hand, the permutation p-value by enumerating every window as the "located" one; and
the crossed bootstrap's coverage of a known difference on simulated seeds x requests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2

from interp import paired as P
from interp.stats import seeds_difference


def _mcnemar_by_hand(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _pair(only_a: int, only_b: int, both: int, neither: int, rng) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, bool)
    order = rng.permutation(len(a))
    return a[order], b[order]


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (3, 0), (7, 2), (10, 10), (1, 12), (25, 14)])
def test_mcnemar_exact_is_the_two_sided_binomial_sum(only_a, only_b):
    a, b = _pair(only_a, only_b, 20, 30, np.random.default_rng(0))
    result = P.mcnemar_exact(a, b)
    assert (result["only_a"], result["only_b"]) == (only_a, only_b)
    assert result["p"] == pytest.approx(_mcnemar_by_hand(only_a, only_b), rel=1e-12)


def test_pooled_mcnemar_adds_the_seeds_discordant_pairs():
    rng = np.random.default_rng(1)
    rows = [_pair(4, 1, 5, 10, rng), _pair(6, 2, 3, 9, rng), _pair(2, 0, 8, 10, rng)]
    a, b = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    result = P.pooled_mcnemar_exact(a, b)
    assert (result["only_a"], result["only_b"]) == (12, 3)
    assert result["p"] == pytest.approx(_mcnemar_by_hand(12, 3))


def _cmh_by_hand(a, b) -> tuple[float, float]:
    """The CMH statistic without continuity correction: (sum_k (x_k - E x_k))^2 / sum_k Var x_k,
    x_k the count of "answered" under mode a in seed k, with the hypergeometric mean and variance
    given the stratum's margins."""
    num, var = 0.0, 0.0
    for row_a, row_b in zip(a, b):
        n1, n2 = len(row_a), len(row_b)
        x, m1 = int(row_a.sum()), int(row_a.sum() + row_b.sum())
        n = n1 + n2
        m2 = n - m1
        if m1 == 0 or m2 == 0:
            continue
        num += x - n1 * m1 / n
        var += n1 * n2 * m1 * m2 / (n * n * (n - 1))
    stat = num**2 / var
    return stat, float(chi2.sf(stat, 1))


def test_cmh_matches_its_formula():
    rng = np.random.default_rng(2)
    a = rng.random((4, 50)) < np.array([0.3, 0.5, 0.2, 0.4])[:, None]
    b = rng.random((4, 50)) < np.array([0.4, 0.7, 0.3, 0.6])[:, None]
    result = P.cmh_test(a, b)
    stat, p = _cmh_by_hand(a, b)
    assert result["statistic"] == pytest.approx(stat, rel=1e-9)
    assert result["p"] == pytest.approx(p, rel=1e-9)
    assert result["strata"] == 4 and result["odds_ratio"] < 1  # a answers less often


def test_cmh_skips_strata_without_variation_and_says_one_with_none():
    rng = np.random.default_rng(3)
    a = rng.random((3, 40)) < 0.3
    b = rng.random((3, 40)) < 0.6
    a[1], b[1] = False, False  # a seed where nothing was answered carries no information
    assert P.cmh_test(a, b)["p"] == pytest.approx(_cmh_by_hand(a, b)[1], rel=1e-9)
    zero = np.zeros((3, 40), bool)
    assert P.cmh_test(zero, zero)["p"] == 1.0


def test_holm_is_the_step_down_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    np.testing.assert_allclose(P.holm(p), adjusted)
    with pytest.raises(ValueError, match="NaN"):
        P.holm([0.1, float("nan")])


def test_tost_reads_the_90_percent_crossed_interval():
    rng = np.random.default_rng(4)
    a = rng.random((5, 200)) < 0.5
    same = P.tost(a, a.copy(), margin=0.05)
    assert same["equivalent"] and same["lo90"] == same["hi90"] == 0.0
    far = ~a & (rng.random((5, 200)) < 0.4)  # about 20 points lower, paired request by request
    result = P.tost(far, a, margin=0.05)
    stat = seeds_difference(far, a, ci=0.90)
    assert (result["lo90"], result["hi90"]) == (stat["lo"], stat["hi"])
    assert not result["equivalent"] and result["hi90"] < -0.05


def test_rank_pvalue_counts_ties_against_the_entry():
    values = np.array([0.30, 0.10, 0.20, 0.10, 0.50])
    # brute force: the p-value is the chance that a window picked at random scores at or below it
    for index in range(len(values)):
        at_or_below = sum(values[j] <= values[index] for j in range(len(values)))
        result = P.rank_pvalue(values, index)
        assert result == {"rank": at_or_below, "n": 5, "p": at_or_below / 5}
    assert P.rank_pvalue(values, 1)["rank"] == 2  # tied for first: counted as second
    assert P.rank_pvalue(np.array([0.0, 1.0]), 0)["p"] == 0.5  # never below 1/n
    with pytest.raises(ValueError):
        P.rank_pvalue(values, 5)


def _coverage(seed_by_mode_sd: float, sims: int = 400, n_seeds: int = 5, n_req: int = 80) -> float:
    """Simulated seeds x requests: each request has its own difficulty (shared by the two modes),
    each seed shifts both modes' log-odds alike, mode a has a log-odds shift of -0.6, and that shift
    varies by seed with sd ``seed_by_mode_sd`` (a seed x mode interaction: the two modes' training
    runs of one seed are not the same run).  The modes' flags are paired (one uniform per seed and
    request).  The true difference is the expectation over requests and seeds (a large draw).
    Returns the share of simulations whose nominal 95% ``seeds_difference`` interval covers it."""
    rng = np.random.default_rng(5)

    def rates(difficulty, seed_effect, interaction):
        logit = difficulty[None, :] + seed_effect[:, None]
        return 1 / (1 + np.exp(-(logit - 0.6 + interaction[:, None]))), 1 / (1 + np.exp(-logit))

    def draw(n_s, n_r):
        return rates(rng.normal(-0.5, 1.5, n_r), rng.normal(0, 0.15, n_s), rng.normal(0, seed_by_mode_sd, n_s))

    big_a, big_b = draw(200, 50_000)
    truth = float((big_a - big_b).mean())
    covered = 0
    for sim in range(sims):
        pa, pb = draw(n_seeds, n_req)
        u = rng.random((n_seeds, n_req))
        stat = seeds_difference(u < pa, u < pb, n_boot=500, seed=sim)
        covered += stat["lo"] <= truth <= stat["hi"]
    return covered / sims


@pytest.mark.parametrize("seed_by_mode_sd", [0.2, 0.4])
def test_crossed_bootstrap_covers_a_known_difference(seed_by_mode_sd):
    """PLAN.md's check: the nominal 95% interval covers the known difference in 90-99% of 400
    simulations (5 seeds x 80 requests, 500 bootstrap replicates each to keep it fast), with a
    moderate and a larger seed x mode interaction (sd 0.2 and 0.4 on the log-odds: 98.75% and 96%)."""
    assert 0.90 <= _coverage(seed_by_mode_sd) <= 0.99


@pytest.mark.xfail(strict=True, reason="the crossed bootstrap counts the seed x request noise twice (once in "
                   "the seed draw, once in the request draw), so where that noise is all there is the interval "
                   "is conservative: it covers in more than 99% of simulations")
def test_crossed_bootstrap_is_not_conservative_without_a_seed_by_mode_interaction():
    coverage = _coverage(0.0)
    assert coverage >= 0.90  # never anti-conservative here: only the upper bound fails
    assert coverage <= 0.99
