"""Exact and stratified tests for two fine-tuning modes scored on the same requests with the same
seeds (0/1 "answered" flags, ``[n_seeds, n_requests]``), and the corrections a table of them needs.

- ``mcnemar_exact(a, b)``: one seed; the exact two-sided binomial test on the discordant requests
  (answered by one mode only): under the null each discordant request is a fair coin
  (``scipy.stats.binomtest``).  Requests both modes treat alike carry no information about the
  difference, which is why the test is paired and exact.
- ``cmh_test(a, b)``: across seeds, the Cochran-Mantel-Haenszel test with seeds as strata
  (``statsmodels``' ``StratifiedTable.test_null_odds``, no continuity correction); each stratum's
  table is mode x (answered, refused).  It pools the seeds without letting a seed with a higher
  rate in both modes pass for a mode effect.  Within a seed it counts requests, not pairs, so it
  is conservative when the modes agree on most requests; ``pooled_mcnemar_exact`` is the paired
  counterpart (every seed-request pair its own stratum, which is McNemar on the pooled discordant
  counts).
- ``holm(pvalues)``: Holm's step-down correction (``statsmodels.stats.multitest.multipletests``).
- ``tost(a, b, margin)``: equivalence at ``±margin``: the crossed bootstrap's 90% interval of
  ``a - b`` (``interp.stats.seeds_difference``) lies inside the margin (two one-sided 5% tests).
- ``rank_pvalue(values, index)``: the rank of one entry (lower is better) among all and its exact
  one-sided permutation p-value: the share of entries at or below it (ties count against it), the
  chance that an entry picked at random does at least as well.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Bool, Num
from scipy.stats import binomtest

from interp.stats import seeds_difference


def _flags(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be [seeds, requests] flags of one shape, got {a.shape} and {b.shape}")
    return a, b


def discordant(a: Bool[np.ndarray, " requests"], b: Bool[np.ndarray, " requests"]) -> tuple[int, int]:
    """``(only a, only b)``: requests answered by one mode and not the other."""
    a, b = _flags(a, b)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a: Bool[np.ndarray, " requests"], b: Bool[np.ndarray, " requests"]) -> dict:
    """Exact McNemar test of one seed's paired flags: ``p`` is two-sided; 1 with no discordance."""
    only_a, only_b = discordant(a, b)
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5, alternative="two-sided").pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p}


def pooled_mcnemar_exact(a: Bool[np.ndarray, "seeds requests"], b: Bool[np.ndarray, "seeds requests"]) -> dict:
    """The exact McNemar test on the discordant pairs of every seed together."""
    a, b = _flags(a, b)
    return mcnemar_exact(a.ravel(), b.ravel())


def stratum_tables(a: Bool[np.ndarray, "seeds requests"], b: Bool[np.ndarray, "seeds requests"]) -> np.ndarray:
    """``[2, 2, n_seeds]``: per seed, rows (a, b) and columns (answered, refused)."""
    a, b = _flags(a, b)
    n = a.shape[1]
    ka, kb = a.sum(1), b.sum(1)
    return np.stack([np.stack([ka, n - ka]), np.stack([kb, n - kb])]).astype(float)


def cmh_test(a: Bool[np.ndarray, "seeds requests"], b: Bool[np.ndarray, "seeds requests"]) -> dict:
    """Cochran-Mantel-Haenszel test of ``a`` against ``b`` with seeds as strata: ``p`` (two-sided,
    1 when no stratum varies), the statistic and the Mantel-Haenszel pooled odds ratio."""
    from statsmodels.stats.contingency_tables import StratifiedTable

    tables = stratum_tables(a, b)
    informative = tables[:, :, [bool((t.sum(0) > 0).all()) for t in np.moveaxis(tables, 2, 0)]]
    if informative.shape[2] == 0:  # every stratum has all answered or all refused: no evidence
        return {"p": 1.0, "statistic": 0.0, "odds_ratio": float("nan"), "strata": tables.shape[2]}
    table = StratifiedTable(informative)
    result = table.test_null_odds(correction=False)
    p = float(result.pvalue)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = float(table.oddsratio_pooled)
    return {"p": 1.0 if math.isnan(p) else p, "statistic": float(result.statistic), "odds_ratio": odds,
            "strata": tables.shape[2]}


def holm(pvalues: Num[np.ndarray, " tests"], alpha: float = 0.05) -> np.ndarray:
    """Holm-adjusted p-values, in the order given."""
    from statsmodels.stats.multitest import multipletests

    pvalues = np.asarray(pvalues, dtype=float)
    if pvalues.size == 0:
        return pvalues
    if np.isnan(pvalues).any():
        raise ValueError("holm: a p-value is NaN")
    return multipletests(pvalues, alpha=alpha, method="holm")[1]


def tost(a: Num[np.ndarray, "seeds requests"], b: Num[np.ndarray, "seeds requests"], margin: float = 0.05,
         n_boot: int = 2000, seed: int = 0) -> dict:
    """Equivalence of ``a - b`` within ``±margin`` (a share, 0.05 = 5 points): the crossed bootstrap's
    90% interval must lie strictly inside the margin."""
    stat = seeds_difference(a, b, n_boot=n_boot, seed=seed, ci=0.90)
    return {"mean": stat["mean"], "lo90": stat["lo"], "hi90": stat["hi"], "margin": margin,
            "equivalent": bool(-margin < stat["lo"] and stat["hi"] < margin)}


def rank_pvalue(values: Num[np.ndarray, " entries"], index: int) -> dict:
    """Rank of ``values[index]`` (1 = lowest; ties count against it) among all entries, and the
    exact one-sided permutation p-value ``rank / n`` (never below ``1 / n``)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or not 0 <= index < len(values):
        raise ValueError(f"need a 1-D array and an index inside it, got shape {values.shape} and {index}")
    rank = int((values <= values[index]).sum())
    return {"rank": rank, "n": len(values), "p": rank / len(values)}
