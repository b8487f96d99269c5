"""The refusal direction (``interp.direction``) against hand-built references on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.data import load_pairs
from interp.direction import (
    ablation_hooks,
    addition_hooks,
    direction_ablation,
    direction_addition,
    fit_directions,
    intervention_rates,
    select_layer,
    separation_from_acts,
)
from interp.hooks import hook_name
from interp.models import single_thread
from interp.patching import prompt_log_odds
from interp.stats import auroc


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def train():
    return load_pairs("train")[:6]


@pytest.fixture(scope="module")
def directions(tiny, train):
    return fit_directions(tiny, train, batch_size=4)


@torch.no_grad()
def hidden_last(model, query):
    """HF's hidden states of one unpadded prompt at its last position: ``[layer + 1, d_model]``."""
    out = model.hf_model(**model.encode([query]), output_hidden_states=True)
    return torch.stack([h[0, -1] for h in out.hidden_states])


@torch.no_grad()
def capture_all(model, query, names, hooks=()):
    """Every position's value of each hook in ``names``, after ``hooks`` (one unpadded prompt)."""
    found = {}

    def read(name):
        def hook(value, hook):
            found[name] = value[0].clone()
            return value

        return hook

    with model.bridge.hooks(fwd_hooks=list(hooks) + [(name, read(name)) for name in names]):
        logits = model.hf_model(**model.encode([query])).logits[0, -1]
    return found, logits


def test_directions_are_differences_of_per_prompt_means(tiny, train, directions):
    # HF's hidden_states[l + 1] is resid_post of layer l, except the last (final norm applied)
    harmful = torch.stack([hidden_last(tiny, p.harmful) for p in train])[:, 1:]
    benign = torch.stack([hidden_last(tiny, p.benign) for p in train])[:, 1:]
    n = tiny.n_layers - 1
    expected = harmful.mean(0) - benign.mean(0)
    assert torch.allclose(directions.difference[:n], expected[:n], atol=1e-4)
    for layer in range(tiny.n_layers):
        unit = directions.unit(layer)
        assert float(unit.norm()) == pytest.approx(1.0, abs=1e-5)
        assert directions.scale(layer) == pytest.approx(float(directions.difference[layer].norm()), rel=1e-6)


def test_test_and_validation_pairs_cannot_shape_the_direction(tiny, directions):
    with pytest.raises(ValueError, match="test pairs"):
        fit_directions(tiny, load_pairs("test")[:2])
    with pytest.raises(ValueError, match="validation"):
        select_layer(tiny, directions, load_pairs("test")[:2])
    with pytest.raises(ValueError, match="train"):
        fit_directions(tiny, load_pairs("validation")[:2])


def test_ablation_leaves_every_residual_orthogonal_to_the_direction(tiny, train):
    torch.manual_seed(0)
    direction = torch.randn(tiny.config.hidden_size)
    unit = direction / direction.norm()
    sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    names = [hook_name(s, layer) for s in sites for layer in range(tiny.n_layers)]
    names += [f"blocks.{layer}.hook_resid_mid" for layer in range(tiny.n_layers)]
    clean, _ = capture_all(tiny, train[0].harmful, names)
    ablated, _ = capture_all(tiny, train[0].harmful, names, ablation_hooks(direction, tiny.n_layers))
    for name in names:
        scale = float(clean[name].norm(dim=-1).max())
        assert float((ablated[name] @ unit).abs().max()) < 1e-5 * max(scale, 1.0), name
        assert float((clean[name] @ unit).abs().max()) > 1e-3, name  # the check is not vacuous


def test_addition_moves_the_projection_by_its_scale_at_every_position(tiny, train, directions):
    layer = 1
    name = hook_name("resid_post", layer)
    clean, _ = capture_all(tiny, train[1].benign, [name])
    added, _ = capture_all(tiny, train[1].benign, [name], direction_addition(tiny, directions, layer))
    shift = added[name] - clean[name]
    expected = directions.scale(layer) * directions.unit(layer)
    assert torch.allclose(shift, expected.expand_as(shift), atol=1e-4)


def test_addition_then_ablation_equals_ablation_alone(tiny, train, directions):
    for layer in range(tiny.n_layers - 1):
        ablate = direction_ablation(tiny, directions, layer)
        for query in (train[0].harmful, train[0].benign):
            _, alone = capture_all(tiny, query, [], ablate)
            _, both = capture_all(tiny, query, [], direction_addition(tiny, directions, layer) + ablate)
            _, added = capture_all(tiny, query, [], direction_addition(tiny, directions, layer))
            assert torch.allclose(both, alone, atol=1e-4)
            assert not torch.allclose(added, alone, atol=1e-3)


def test_addition_hooks_scale_an_unnormalised_direction():
    direction = torch.tensor([3.0, 4.0])
    (name, hook), = addition_hooks(direction, 2, coeff=10.0)
    assert name == "blocks.2.hook_resid_post"
    assert torch.allclose(hook(torch.zeros(1, 2, 2), None), torch.tensor([6.0, 8.0]).expand(1, 2, 2))


def test_separation_matches_a_hand_computed_auroc_and_gap():
    torch.manual_seed(2)
    layers, d = 3, 5
    from interp.direction import RefusalDirections

    dirs = RefusalDirections("synthetic", torch.randn(layers, d) + 1, torch.randn(layers, d), ["p-1"])
    harmful, benign = torch.randn(7, layers, d) + 0.5, torch.randn(9, layers, d)
    frame = separation_from_acts(dirs, harmful, benign)
    from sklearn.metrics import roc_auc_score

    for layer in range(layers):
        unit = dirs.difference[layer] / dirs.difference[layer].norm()
        h, b = (harmful[:, layer] @ unit).numpy(), (benign[:, layer] @ unit).numpy()
        row = frame.iloc[layer]
        expected = roc_auc_score([1] * len(h) + [0] * len(b), np.concatenate([h, b]))
        assert row["auroc"] == pytest.approx(expected)
        assert row["gap"] == pytest.approx(h.mean() - b.mean(), abs=1e-5)
    assert auroc([1, 2], [2, 0]) == pytest.approx(0.625)  # one tie counts half


def test_select_layer_follows_its_rule_on_validation_scores(tiny, directions):
    validation = load_pairs("validation")[:3]
    selection = select_layer(tiny, directions, validation, candidates=[0, 1, 2], max_kl=0.5)
    table = selection.table.set_index("layer")
    harmful = [p.harmful for p in validation]
    benign = [p.benign for p in validation]
    for layer in (0, 1, 2):
        ablate = direction_ablation(tiny, directions, layer)
        ablated = prompt_log_odds(tiny, harmful, ablate).mean()
        added = prompt_log_odds(tiny, benign, direction_addition(tiny, directions, layer)).mean()
        # KL(clean || ablated) of each benign prompt's next token, one unpadded prompt at a time
        kl = np.mean([float((p * (p.log() - q.log())).sum()) for p, q in (
            (capture_all(tiny, query, [])[1].double().softmax(-1), capture_all(tiny, query, [], ablate)[1].double()
             .softmax(-1)) for query in benign)])
        assert table.loc[layer, "ablation_harmful"] == pytest.approx(float(ablated), abs=1e-5)
        assert table.loc[layer, "induces"] == bool(added > selection.clean_benign)
        assert table.loc[layer, "ablation_benign_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert table.loc[layer, "kl_ok"] == (kl <= 0.5)
    pool = table[table["induces"]] if table["induces"].any() else table
    limit = 0.5
    while not (pool["ablation_benign_kl"] <= limit).any():
        limit *= 2
    eligible = pool[pool["ablation_benign_kl"] <= limit]
    assert selection.layer == int(eligible["ablation_harmful"].idxmin())
    assert f"KL <= {limit:g}" in selection.criterion
    strict = select_layer(tiny, directions, validation, candidates=[0, 1, 2], max_kl=1e-9)
    assert "doubled" in strict.criterion


def test_intervention_rates_judge_every_condition_and_side(tiny, directions):
    pairs = load_pairs("test")[:2]
    rates = intervention_rates(tiny, directions, 1, pairs, max_new_tokens=3)
    frame = rates.to_frame()
    assert sorted(zip(frame["condition"], frame["side"])) == sorted(
        (c, s) for c in ("clean", "ablation", "addition") for s in ("harmful", "benign"))
    assert set(frame["n"]) == {2}
