"""Per-layer linear separability of normal vs malicious last-token vectors.

Two read-outs per layer, both scored on held-out folds of a stratified k-fold split:

- a logistic-regression probe (scikit-learn; features standardised on the train folds);
- the difference-in-means direction ``d = mean(malicious) - mean(normal)`` of the train folds,
  scoring a prompt by its projection ``x . d`` and calling it malicious above the midpoint
  ``(mean(malicious) + mean(normal)) / 2 . d``; no fitting beyond two means, so it shows how
  much of the separation a single direction carries.

Accuracy and AUROC are averaged over folds (their spread is the fold standard deviation).
``dim_norm`` is the norm of the difference-in-means direction fitted on all prompts, and
``dim_norm_rel`` that norm divided by the mean vector norm at the layer (residual norms grow
with depth, so the raw norm alone is hard to compare across layers).

The paper has no probe (PAPER.md §1); this adds a second view of the same question: from which
layer on are the two kinds of prompt told apart?
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from tqdm.auto import tqdm

from interp.cosine import PairSetError, check_pair_sets
from interp.stats import auroc


def layer_features(normal: Tensor, malicious: Tensor) -> tuple[Float[np.ndarray, "prompt layer d_model"], np.ndarray]:
    """Stack the two sets into float64 features and labels (0 normal, 1 malicious)."""
    features = np.concatenate([normal.double().numpy(), malicious.double().numpy()])
    labels = np.concatenate([np.zeros(normal.shape[0], dtype=int), np.ones(malicious.shape[0], dtype=int)])
    return features, labels


def _folds(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None):
    """Stratified k folds; with ``groups`` (e.g. a pair id per prompt) no group is split across
    folds, so a harmful prompt and its benign twin are always held out together."""
    smallest = int(np.bincount(labels).min())
    if k < 2:
        raise ValueError(f"need at least 2 folds, got k={k}")
    if groups is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        if len(np.unique(groups)) < k:
            raise PairSetError(f"need at least k={k} groups for grouped {k}-fold")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))
    if smallest < k:
        raise PairSetError(f"each set needs at least k={k} prompts for stratified {k}-fold; the smaller has {smallest}")
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def logistic_probe_scores(x: np.ndarray, labels: np.ndarray, folds, C: float = 1.0) -> tuple[list[float], list[float]]:
    """Held-out accuracy and AUROC of a standardised logistic-regression probe, per fold."""
    accuracy, aucs = [], []
    for train, test in folds:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(x[train], labels[train])
        accuracy.append(float((probe.predict(x[test]) == labels[test]).mean()))
        scores = probe.decision_function(x[test])
        aucs.append(auroc(scores[labels[test] == 1], scores[labels[test] == 0]))
    return accuracy, aucs


def mean_difference_scores(x: np.ndarray, labels: np.ndarray, folds) -> tuple[list[float], list[float]]:
    """Held-out accuracy and AUROC of the train folds' difference-in-means direction, per fold."""
    accuracy, aucs = [], []
    for train, test in folds:
        mean_n = x[train][labels[train] == 0].mean(0)
        mean_m = x[train][labels[train] == 1].mean(0)
        direction = mean_m - mean_n
        scores = x[test] @ direction
        midpoint = (mean_m + mean_n) @ direction / 2
        accuracy.append(float(((scores > midpoint).astype(int) == labels[test]).mean()))
        aucs.append(auroc(scores[labels[test] == 1], scores[labels[test] == 0]))
    return accuracy, aucs


def probe_layers(
    normal: Float[Tensor, "p layer d_model"],
    malicious: Float[Tensor, "q layer d_model"],
    k: int = 5,
    seed: int = 0,
    C: float = 1.0,
    progress: bool = True,
    pairs: bool = False,
) -> pd.DataFrame:
    """One row per layer: held-out accuracy/AUROC (mean and fold sd) of the logistic probe and of
    the difference-in-means direction, and that direction's norm (absolute and relative).  With
    ``pairs`` (``normal[i]`` and ``malicious[i]`` share a sentence frame) the folds never split a
    pair."""
    check_pair_sets(normal, malicious)
    x, labels = layer_features(normal, malicious)
    groups = None
    if pairs:
        if normal.shape[0] != malicious.shape[0]:
            raise PairSetError(f"paired sets need equal sizes, got {normal.shape[0]} and {malicious.shape[0]}")
        groups = np.concatenate([np.arange(normal.shape[0]), np.arange(malicious.shape[0])])
    folds = _folds(labels, k, seed, groups)
    rows = []
    for layer in tqdm(range(x.shape[1]), desc="probe layers", unit="layer", disable=not progress):
        xl = x[:, layer]
        lr_acc, lr_auc = logistic_probe_scores(xl, labels, folds, C)
        dim_acc, dim_auc = mean_difference_scores(xl, labels, folds)
        direction = xl[labels == 1].mean(0) - xl[labels == 0].mean(0)
        rows.append({
            "layer": layer,
            "probe_acc": np.mean(lr_acc), "probe_acc_sd": np.std(lr_acc),
            "probe_auroc": np.mean(lr_auc), "probe_auroc_sd": np.std(lr_auc),
            "dim_acc": np.mean(dim_acc), "dim_acc_sd": np.std(dim_acc),
            "dim_auroc": np.mean(dim_auc), "dim_auroc_sd": np.std(dim_auc),
            "dim_norm": float(np.linalg.norm(direction)),
            "dim_norm_rel": float(np.linalg.norm(direction) / np.linalg.norm(xl, axis=1).mean()),
        })
    return pd.DataFrame(rows)
