"""Uncertainty of rates: with 100 requests a rate has a 95% interval of about ±9 points, so
every rate the toolkit reports comes with one.

- ``wilson(k, n)``: the Wilson score interval of a binomial proportion (one model, one set);
- ``seeds_interval(flags)``: for a rate measured on the same ``n`` requests in several
  training seeds, the mean and a 95% interval from a crossed bootstrap (resample seeds, and
  resample requests once for all of them, since every seed saw the same requests), so both
  sources of variation count and repeating a seed cannot narrow the interval;
- ``seeds_difference(a, b)``: the same bootstrap for the difference of two such rates measured
  on the same requests with the same seeds (SPPFT against full fine-tuning), paired by seed and
  by request, which is narrower than comparing the two intervals when the runs agree on most
  requests;
- ``Rate``: a count with its interval, as a dataclass with ``to_dict``;
- ``auroc(positive, negative)``: the one AUROC (scikit-learn's ``roc_auc_score``) that probes and
  the refusal direction's separation report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``(nan, nan)`` for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``, with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": self.rate, "lo": lo, "hi": hi}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.k}/{self.n} ({self.rate:.1%}, 95% CI {lo:.1%}-{hi:.1%})"


def seeds_interval(flags, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Mean rate and a percentile interval over seeds and requests: ``flags`` is
    ``[n_seeds, n_requests]`` (0/1 per request per training seed, the same requests in every
    seed).  Each replicate draws seeds with replacement and, independently, one set of requests
    with replacement that every drawn seed is scored on.  (Drawing requests afresh within each
    seed would treat the seeds' requests as independent samples: with three identical seeds it
    gives an interval about sqrt(3) too narrow.)"""
    flags = np.asarray(flags, dtype=float)
    if flags.ndim != 2 or flags.size == 0:
        raise ValueError(f"flags must be [seeds, requests], got shape {flags.shape}")
    lo, hi = _crossed_bootstrap(flags, n_boot, seed, ci)
    n_seeds, n_req = flags.shape
    return {"mean": float(flags.mean()), "lo": lo, "hi": hi, "n_seeds": n_seeds, "n_requests": n_req,
            "per_seed": [float(v) for v in flags.mean(axis=1)]}


def seeds_difference(a, b, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Mean of ``a - b`` and a percentile interval, for two ``[n_seeds, n_requests]`` 0/1 arrays
    whose row ``i`` comes from the same training seed and column ``j`` from the same request.
    Each replicate draws seed indices with replacement and one set of requests with replacement,
    and scores *both* arrays on that draw, so what the two runs share (a request every mode
    refuses, a seed's batch order) cancels instead of widening the interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or a.size == 0 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [seeds, requests] of one shape, got {a.shape} and {b.shape}")
    diff = a - b  # the mean is linear, so scoring both arrays on one draw is bootstrapping their difference
    lo, hi = _crossed_bootstrap(diff, n_boot, seed, ci)
    n_seeds, n_req = diff.shape
    return {"mean": float(diff.mean()), "lo": lo, "hi": hi, "n_seeds": n_seeds, "n_requests": n_req}


def _crossed_bootstrap(values: np.ndarray, n_boot: int, seed: int, ci: float) -> tuple[float, float]:
    """Percentile interval of the mean of ``[n_seeds, n_requests]`` values: each replicate draws
    seeds with replacement and one set of requests with replacement shared by every drawn seed."""
    rng = np.random.default_rng(seed)
    n_seeds, n_req = values.shape
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    req_draws = rng.integers(0, n_req, size=(n_boot, n_req))
    boots = values[seed_draws[..., None], req_draws[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def auroc(positive, negative) -> float:
    """Probability that a score of ``positive`` exceeds one of ``negative`` (ties count half):
    ``roc_auc_score`` with ``positive`` labelled 1; NaN when either side is empty."""
    positive, negative = np.asarray(positive, float).ravel(), np.asarray(negative, float).ravel()
    if not len(positive) or not len(negative):
        return float("nan")
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(labels, np.r_[positive, negative]))
