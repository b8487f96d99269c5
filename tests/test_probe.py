"""Linear probes on synthetic activations: separable layers, pure-noise layers, shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.cosine import PairSetError
from interp.probe import probe_layers


def synthetic(n=60, d=16, seed=0):
    """Layer 0: both sets from one distribution.  Layer 1: malicious shifted by 3 sd along one
    direction (linearly separable with a wide margin)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, 2, d, generator=g)
    malicious = torch.randn(n, 2, d, generator=g)
    direction = torch.randn(d, generator=g)
    malicious[:, 1] += 6 * direction / direction.norm()
    return normal, malicious


def test_separable_layer_scores_one_and_noise_layer_scores_chance():
    normal, malicious = synthetic()
    table = probe_layers(normal, malicious, k=5, progress=False)
    separable, noise = table.iloc[1], table.iloc[0]
    for metric in ("probe_acc", "probe_auroc", "dim_acc", "dim_auroc"):
        assert separable[metric] >= 0.97, metric
        assert abs(noise[metric] - 0.5) < 0.15, metric


def test_shuffled_labels_score_chance():
    normal, malicious = synthetic()
    everything = torch.cat([normal, malicious])
    perm = torch.randperm(len(everything), generator=torch.Generator().manual_seed(3))
    shuffled = everything[perm]
    table = probe_layers(shuffled[:60], shuffled[60:], k=5, progress=False)
    for metric in ("probe_acc", "probe_auroc", "dim_acc", "dim_auroc"):
        assert abs(table.iloc[1][metric] - 0.5) < 0.15, metric


def test_direction_norm_is_the_distance_between_the_means():
    normal, malicious = synthetic(n=30)
    table = probe_layers(normal, malicious, k=3, progress=False)
    for layer in range(2):
        n, m = normal[:, layer].double().numpy(), malicious[:, layer].double().numpy()
        expected = np.linalg.norm(m.mean(0) - n.mean(0))
        mean_norm = np.linalg.norm(np.concatenate([n, m]), axis=1).mean()
        assert table.iloc[layer]["dim_norm"] == pytest.approx(expected, rel=1e-9)
        assert table.iloc[layer]["dim_norm_rel"] == pytest.approx(expected / mean_norm, rel=1e-9)
    assert table.iloc[1]["dim_norm"] > 4 > table.iloc[0]["dim_norm"]


def test_too_few_prompts_or_mismatched_sets_are_clear_errors():
    normal, malicious = synthetic(n=4)
    with pytest.raises(PairSetError, match="at least k=5 prompts"):
        probe_layers(normal, malicious, k=5, progress=False)
    with pytest.raises(PairSetError, match="different d_model"):
        probe_layers(normal, malicious[..., :8], k=2, progress=False)
    with pytest.raises(PairSetError, match="normal set has 1 prompt"):
        probe_layers(normal[:1], malicious, k=2, progress=False)
    with pytest.raises(ValueError, match="at least 2 folds"):
        probe_layers(normal, malicious, k=1, progress=False)
