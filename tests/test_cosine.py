"""Per-layer cosine statistics against plain Python double loops, and clear errors on bad input."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from interp.cosine import (
    PAPER_SEEDS,
    PairSetError,
    all_pairs_cosines,
    bootstrap_gaps,
    check_pair_sets,
    paper_pair_indices,
    sampled_pair_cosines,
    similarity_table,
    weighted_gaps,
)


def random_sets(p=7, q=5, layers=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(layers, d, generator=g)  # a common component, so cosines are not ~0
    normal = torch.randn(p, layers, d, generator=g) + 2 * shared
    malicious = torch.randn(q, layers, d, generator=g) + 2 * shared + torch.linspace(0, 1.5, layers)[:, None]
    return normal, malicious


def cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def angle(c):
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def naive_pairs(normal, malicious, layer):
    n = normal[:, layer].tolist()
    m = malicious[:, layer].tolist()
    return {
        "nn": [cos(n[i], n[j]) for i in range(len(n)) for j in range(len(n)) if i < j],
        "mm": [cos(m[i], m[j]) for i in range(len(m)) for j in range(len(m)) if i < j],
        "nm": [cos(a, b) for a in n for b in m],
    }


def test_all_pairs_statistic_equals_a_naive_double_loop():
    normal, malicious = random_sets()
    table = similarity_table(normal, malicious, "all")
    for layer in range(normal.shape[1]):
        pairs = naive_pairs(normal, malicious, layer)
        row = table.iloc[layer]
        for kind, values in pairs.items():
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            assert row[f"{kind}_pairs"] == len(values)
            assert row[f"{kind}_mean"] == pytest.approx(mean, abs=1e-12)
            assert row[f"{kind}_std"] == pytest.approx(sd, abs=1e-12)
            assert row[f"{kind}_angle"] == pytest.approx(sum(map(angle, values)) / len(values), abs=1e-9)
        mean_angle = {k: sum(map(angle, v)) / len(v) for k, v in pairs.items()}
        mean_cos = {k: sum(v) / len(v) for k, v in pairs.items()}
        assert row["gap_paper"] == pytest.approx(mean_angle["nm"] - mean_angle["nn"], abs=1e-9)
        assert row["gap_code"] == pytest.approx(angle(mean_cos["nm"]) - angle(mean_cos["nn"]), abs=1e-9)


def test_all_pairs_counts_each_unordered_pair_once_and_no_self_pairs():
    normal, malicious = random_sets(p=6, q=4)
    pairs = all_pairs_cosines(normal, malicious)
    assert pairs["nn"].shape == (3, 15) and pairs["mm"].shape == (3, 6) and pairs["nm"].shape == (3, 24)
    assert (pairs["nn"] < 1 - 1e-9).all()  # random vectors: no pair is a vector with itself


def test_paper_pair_indices_pick_what_the_paper_code_picks_from_strings():
    pool_a = [f"normal {i}" for i in range(100)]
    pool_b = [f"malicious {i}" for i in range(90)]
    same = paper_pair_indices(100, 100, 20, PAPER_SEEDS["nn"], same_pool=True)
    cross = paper_pair_indices(100, 90, 20, PAPER_SEEDS["nm"], same_pool=False)
    for draw, seed in enumerate(range(10, 30)):
        random.seed(seed)
        assert random.sample(pool_a, 2) == [pool_a[i] for i in same[draw]]
    for draw, seed in enumerate(range(1000, 1020)):
        random.seed(seed)
        first = random.sample(pool_a, 1)[0]
        second = random.sample(pool_b, 1)[0]
        assert (first, second) == (pool_a[cross[draw, 0]], pool_b[cross[draw, 1]])
    assert (same[:, 0] != same[:, 1]).all()


def test_sampled_estimator_equals_per_pair_numpy_cosine():
    normal, malicious = random_sets(p=12, q=9)
    r = 40
    got = sampled_pair_cosines(normal, malicious, r=r)
    sets = {"nn": (normal, normal), "mm": (malicious, malicious), "nm": (normal, malicious)}
    for kind, (a, b) in sets.items():
        idx = paper_pair_indices(len(a), len(b), r, PAPER_SEEDS[kind], same_pool=kind != "nm")
        for layer in range(normal.shape[1]):
            expected = [
                np.dot(a[i, layer].numpy(), b[j, layer].numpy())
                / (np.linalg.norm(a[i, layer].numpy()) * np.linalg.norm(b[j, layer].numpy()))
                for i, j in idx
            ]
            np.testing.assert_allclose(got[kind][layer].numpy(), expected, atol=1e-6)
    table = similarity_table(normal, malicious, "sampled", r=r)
    assert (table["nn_pairs"] == r).all()


def test_weighted_gaps_with_unit_counts_equal_the_point_estimate():
    normal, malicious = random_sets()
    gaps = weighted_gaps(normal, malicious, torch.ones(1, len(normal)), torch.ones(1, len(malicious)))
    table = similarity_table(normal, malicious)
    np.testing.assert_allclose(gaps["gap_paper"][0].numpy(), table["gap_paper"], atol=1e-9)
    np.testing.assert_allclose(gaps["gap_code"][0].numpy(), table["gap_code"], atol=1e-9)


def test_weighted_gaps_equal_a_naive_resample_without_copy_pairs():
    normal, malicious = random_sets(p=5, q=4, layers=2)
    counts_n, counts_m = torch.tensor([[2.0, 0, 1, 3, 1]]), torch.tensor([[0.0, 2, 1, 1]])
    gaps = weighted_gaps(normal, malicious, counts_n, counts_m)
    drawn_n = [i for i, c in enumerate(counts_n[0].int().tolist()) for _ in range(c)]
    drawn_m = [i for i, c in enumerate(counts_m[0].int().tolist()) for _ in range(c)]
    for layer in range(2):
        n, m = normal[:, layer].tolist(), malicious[:, layer].tolist()
        nn = [cos(n[a], n[b]) for x, a in enumerate(drawn_n) for y, b in enumerate(drawn_n) if x < y and a != b]
        nm = [cos(n[a], m[b]) for a in drawn_n for b in drawn_m]
        paper = sum(map(angle, nm)) / len(nm) - sum(map(angle, nn)) / len(nn)
        code = angle(sum(nm) / len(nm)) - angle(sum(nn) / len(nn))
        assert gaps["gap_paper"][0, layer].item() == pytest.approx(paper, abs=1e-9)
        assert gaps["gap_code"][0, layer].item() == pytest.approx(code, abs=1e-9)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_prompts():
    small = random_sets(p=10, q=10, layers=4, seed=1)
    large = random_sets(p=80, q=80, layers=4, seed=1)
    widths = []
    for normal, malicious in (small, large):
        table = similarity_table(normal, malicious)
        ci = bootstrap_gaps(normal, malicious, n_boot=400, seed=0)
        for name in ("gap_paper", "gap_code"):
            assert (ci[f"{name}_lo"] <= table[name] + 1e-9).all() and (table[name] <= ci[f"{name}_hi"] + 1e-9).all()
        widths.append((ci["gap_code_hi"] - ci["gap_code_lo"]).mean())
    assert widths[1] < widths[0]


@pytest.mark.parametrize(
    "normal, malicious, message",
    [
        (torch.randn(1, 3, 4), torch.randn(5, 3, 4), "normal set has 1 prompt"),
        (torch.randn(5, 3, 4), torch.randn(0, 3, 4), "malicious set has 0 prompt"),
        (torch.randn(5, 3, 4), torch.randn(5, 2, 4), "different numbers of layers: 3 vs 2"),
        (torch.randn(5, 3, 4), torch.randn(5, 3, 8), "different d_model: 4 vs 8"),
        (torch.randn(5, 4), torch.randn(5, 3, 4), r"\[prompt, layer, d_model\]"),
        (torch.full((3, 2, 4), float("nan")), torch.randn(3, 2, 4), "NaN"),
    ],
)
def test_bad_input_is_a_clear_error(normal, malicious, message):
    with pytest.raises(PairSetError, match=message):
        check_pair_sets(normal, malicious)
    with pytest.raises(PairSetError, match=message):
        similarity_table(normal, malicious)
    with pytest.raises(PairSetError, match=message):
        bootstrap_gaps(normal, malicious, n_boot=10)


def test_zero_vector_and_unknown_method_are_clear_errors():
    normal, malicious = random_sets()
    normal[0, 1] = 0
    with pytest.raises(PairSetError, match="zero vector"):
        similarity_table(normal, malicious)
    with pytest.raises(ValueError, match="unknown method"):
        similarity_table(*random_sets(), method="mean")
