"""Per-layer cosine similarity of normal (N) and malicious (M) prompts' last-token vectors.

Three pair types, as in Li et al. §3.2: N-N (two distinct normal prompts), M-M (two distinct
malicious prompts) and N-M (one of each).  Two ways to summarise them:

- ``all_pairs_cosines``: the exact statistic over *all* pairs.  One normalised matrix product per
  layer gives every cosine at once; N-N and M-M keep the strict upper triangle (no self-pairs,
  each unordered pair once), N-M keeps all ``P*Q`` pairs.
- ``sampled_pair_cosines``: the paper's estimator.  ``r`` draws per type; before each draw
  ``random.seed(s)`` is called and ``s`` increased by one, starting at 10 (N-N), 100 (M-M) and
  1000 (N-M); a same-set draw is ``random.sample(pool, 2)``, a cross draw
  ``random.sample(normal, 1)`` then ``random.sample(malicious, 1)``.  Sampling indices with the
  same calls picks the same items as sampling the strings, so the pairs are the paper's.

The angle gap between N-M and N-N pairs, in degrees, has two definitions:

- ``gap_paper``: the paper's text, the mean over pairs of angle(N,M) minus the mean over pairs of
  angle(N,N'), angle = degrees(arccos(cos));
- ``gap_code``: the paper's plotting code, degrees(arccos(mean cos N-M)) - degrees(arccos(mean
  cos N-N)) (the arccos of the mean, not the mean of the angles).

``bootstrap_gaps`` gives percentile confidence intervals for both, resampling prompts (each set
with replacement, independently); pairs of a prompt with its own copy are left out, as self-pairs
are in the point estimate.  All arithmetic is float64.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import SafetyLayersError

PAIR_TYPES = ("nn", "mm", "nm")
PAPER_R = 500
PAPER_SEEDS = {"nn": 10, "mm": 100, "nm": 1000}


class PairSetError(SafetyLayersError, ValueError):
    """Two activation sets that cannot be compared (too few prompts, mismatched shapes)."""


def check_pair_sets(normal: Tensor, malicious: Tensor, min_prompts: int = 2) -> None:
    """Raise ``PairSetError`` unless both sets are ``[prompt, layer, d_model]`` with at least
    ``min_prompts`` prompts each, the same layers and the same d_model, and finite values."""
    for name, acts in (("normal", normal), ("malicious", malicious)):
        if not isinstance(acts, Tensor):
            raise PairSetError(f"{name} activations must be a torch tensor, got {type(acts).__name__}")
        if acts.ndim != 3:
            raise PairSetError(f"{name} activations must be [prompt, layer, d_model], got shape {tuple(acts.shape)}")
        if acts.shape[0] < min_prompts:
            raise PairSetError(
                f"{name} set has {acts.shape[0]} prompt(s); need at least {min_prompts} to form pairs"
            )
        if not torch.isfinite(acts).all():
            raise PairSetError(f"{name} activations hold NaN or infinite values")
    if normal.shape[1] != malicious.shape[1]:
        raise PairSetError(f"the sets have different numbers of layers: {normal.shape[1]} vs {malicious.shape[1]}")
    if normal.shape[2] != malicious.shape[2]:
        raise PairSetError(f"the sets have different d_model: {normal.shape[2]} vs {malicious.shape[2]}")


def _unit(acts: Tensor) -> Float[Tensor, "layer prompt d_model"]:
    acts = acts.double().transpose(0, 1)
    norms = acts.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise PairSetError("a zero vector has no direction; cosine similarity is undefined")
    return acts / norms


def cosine_matrices(a: Float[Tensor, "p layer d_model"], b: Float[Tensor, "q layer d_model"]) -> Float[Tensor, "layer p q"]:
    """Every cosine between a row of ``a`` and a row of ``b``, per layer (one batched matmul)."""
    return (_unit(a) @ _unit(b).transpose(1, 2)).clamp(-1.0, 1.0)


def all_pairs_cosines(normal: Tensor, malicious: Tensor) -> dict[str, Float[Tensor, "layer pair"]]:
    """Cosines of all N-N and M-M unordered pairs of distinct prompts and all N-M pairs, per layer."""
    check_pair_sets(normal, malicious)
    out = {}
    for kind, acts in (("nn", normal), ("mm", malicious)):
        i, j = torch.triu_indices(acts.shape[0], acts.shape[0], offset=1)
        out[kind] = cosine_matrices(acts, acts)[:, i, j]
    out["nm"] = cosine_matrices(normal, malicious).flatten(1)
    return out


def paper_pair_indices(n_a: int, n_b: int, r: int, seed: int, same_pool: bool) -> np.ndarray:
    """The paper's ``r`` draws as an ``[r, 2]`` index array (see the module docstring)."""
    if r < 1:
        raise ValueError(f"r must be at least 1, got {r}")
    pairs = []
    for s in range(seed, seed + r):
        random.seed(s)
        if same_pool:
            pairs.append(random.sample(range(n_a), 2))
        else:
            pairs.append([random.sample(range(n_a), 1)[0], random.sample(range(n_b), 1)[0]])
    return np.asarray(pairs, dtype=np.int64)


def sampled_pair_cosines(
    normal: Tensor, malicious: Tensor, r: int = PAPER_R, seeds: dict[str, int] | None = None
) -> dict[str, Float[Tensor, "layer pair"]]:
    """The paper's estimator: cosines of ``r`` seeded random pairs per type, per layer."""
    check_pair_sets(normal, malicious)
    seeds = {**PAPER_SEEDS, **(seeds or {})}
    sets = {"nn": (normal, normal), "mm": (malicious, malicious), "nm": (normal, malicious)}
    out = {}
    for kind, (a, b) in sets.items():
        idx = paper_pair_indices(a.shape[0], b.shape[0], r, seeds[kind], same_pool=kind != "nm")
        ua, ub = _unit(a)[:, idx[:, 0]], _unit(b)[:, idx[:, 1]]
        out[kind] = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    return out


def degrees(cos: Tensor | np.ndarray | float):
    """Angle in degrees of a cosine (clamped into [-1, 1])."""
    if isinstance(cos, Tensor):
        return torch.rad2deg(torch.arccos(cos.double().clamp(-1.0, 1.0)))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def summarise(cosines: dict[str, Tensor]) -> pd.DataFrame:
    """One row per layer: mean, std (ddof 0) and mean angle of each pair type, pair counts,
    and the angle gap in both definitions."""
    n_layers = cosines["nn"].shape[0]
    table = {"layer": np.arange(n_layers)}
    for kind in PAIR_TYPES:
        cos = cosines[kind]
        table[f"{kind}_mean"] = cos.mean(1).numpy()
        table[f"{kind}_std"] = cos.std(1, correction=0).numpy()
        table[f"{kind}_angle"] = degrees(cos).mean(1).numpy()
        table[f"{kind}_pairs"] = np.full(n_layers, cos.shape[1])
    frame = pd.DataFrame(table)
    frame["gap_paper"] = frame["nm_angle"] - frame["nn_angle"]
    frame["gap_code"] = degrees(frame["nm_mean"].to_numpy()) - degrees(frame["nn_mean"].to_numpy())
    return frame


def similarity_table(normal: Tensor, malicious: Tensor, method: str = "all", r: int = PAPER_R, seeds=None) -> pd.DataFrame:
    """``summarise`` of ``all_pairs_cosines`` (``method="all"``) or of the paper's sampled
    estimator (``method="sampled"``)."""
    if method == "all":
        return summarise(all_pairs_cosines(normal, malicious))
    if method == "sampled":
        return summarise(sampled_pair_cosines(normal, malicious, r=r, seeds=seeds))
    raise ValueError(f"unknown method {method!r}; choose 'all' or 'sampled'")


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> Tensor:
    draws = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return torch.from_numpy(counts)


def weighted_gaps(
    normal: Tensor, malicious: Tensor, counts_normal: Tensor, counts_malicious: Tensor
) -> dict[str, Float[Tensor, "boot layer"]]:
    """``gap_paper`` and ``gap_code`` of prompt sets in which prompt ``i`` appears
    ``counts[b, i]`` times (one row ``b`` per bootstrap replicate), with pairs of two copies of
    one prompt left out.  Two weighted quadratic forms per matrix; no loop over replicates."""
    counts_n, counts_m = counts_normal.double(), counts_malicious.double()
    cos_nn = cosine_matrices(normal, normal)
    cos_nn.diagonal(dim1=1, dim2=2).zero_()  # self-pairs never count
    ang_nn = degrees(cos_nn)
    ang_nn.diagonal(dim1=1, dim2=2).zero_()
    cos_nm = cosine_matrices(normal, malicious)
    ang_nm = degrees(cos_nm)
    pairs_nn = counts_n.sum(1) ** 2 - (counts_n**2).sum(1)  # ordered pairs of distinct prompts
    pairs_nm = counts_n.sum(1) * counts_m.sum(1)

    def within(matrix):
        return torch.einsum("bi,lij,bj->bl", counts_n, matrix, counts_n) / pairs_nn[:, None]

    def across(matrix):
        return torch.einsum("bi,lij,bj->bl", counts_n, matrix, counts_m) / pairs_nm[:, None]

    return {
        "gap_paper": across(ang_nm) - within(ang_nn),
        "gap_code": degrees(across(cos_nm)) - degrees(within(cos_nn)),
    }


def bootstrap_counts(n_normal: int, n_malicious: int, n_boot: int = 1000, seed: int = 0, pairs: bool = False):
    """Resampling counts ``[n_boot, n]`` for the two sets: independent draws, or with ``pairs``
    one draw of pair indices used for both sets (a pair stays together)."""
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    if pairs:
        if n_normal != n_malicious:
            raise PairSetError(f"paired sets need equal sizes, got {n_normal} and {n_malicious}")
        counts = _resample_counts(rng, n_normal, n_boot)
        return counts, counts
    return _resample_counts(rng, n_normal, n_boot), _resample_counts(rng, n_malicious, n_boot)


def centred(normal: Tensor, malicious: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets minus their joint per-layer mean: the raw cosine of residual streams is
    dominated by a few large directions every prompt shares; centring removes them."""
    mean = torch.cat([normal, malicious]).double().mean(0, keepdim=True)
    return normal.double() - mean, malicious.double() - mean


def interval_table(gaps: dict[str, Tensor], ci: float = 0.95, suffix: str = "") -> pd.DataFrame:
    """Percentile intervals ``{name}{suffix}_lo/_hi`` per layer from ``[boot, layer]`` replicates."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    table = {"layer": np.arange(next(iter(gaps.values())).shape[1])}
    for name, values in gaps.items():
        values = values.numpy()  # a replicate holding a single distinct normal prompt is NaN
        table[f"{name}{suffix}_lo"] = np.nanquantile(values, lo_q, axis=0)
        table[f"{name}{suffix}_hi"] = np.nanquantile(values, hi_q, axis=0)
    return pd.DataFrame(table)


def bootstrap_gaps(
    normal: Tensor, malicious: Tensor, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, pairs: bool = False
) -> pd.DataFrame:
    """Percentile bootstrap intervals (``gap_paper_lo`` .. ``gap_code_hi``) per layer.

    Each replicate resamples the prompts with replacement (the two sets independently, or with
    ``pairs`` whole pairs) and recomputes both gaps with ``weighted_gaps``.
    """
    check_pair_sets(normal, malicious)
    counts_n, counts_m = bootstrap_counts(normal.shape[0], malicious.shape[0], n_boot, seed, pairs)
    return interval_table(weighted_gaps(normal, malicious, counts_n, counts_m), ci)
