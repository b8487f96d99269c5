"""R_o (interp.overrejection): shared-prefix generation, the first-step estimate and the
start-layer reuse, against independent full computations."""

from __future__ import annotations

import pytest
import torch

from interp import refusal
from interp.overrejection import (
    FirstStepEstimator,
    PromptBatches,
    capture_resid_pre,
    compare_estimate,
    count_over_rejection,
    greedy_texts,
    over_rejection_at,
    over_rejection_prompts,
    pearson,
    prefix_cache,
    refusal_flags,
    refusal_opening_token_ids,
    resume_from_layer,
)
from interp.ranges import LayerRange
from interp.scaling import hook_count, scaled

QUERIES = over_rejection_prompts(10)


def full_last_logits(model, queries):
    """Reference: the plain HF forward on left-padded prompts, positions counted as generate does."""
    enc = model.encode(queries, padding_side="left")
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.hf_model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids).logits[:, -1]


def test_prompts_subset():
    assert len(over_rejection_prompts()) == 731
    assert over_rejection_prompts(3) == over_rejection_prompts()[:3]
    everything = over_rejection_prompts()
    spread = over_rejection_prompts(100, spread=True)
    assert len(spread) == len(set(spread)) == 100 and set(spread) <= set(everything)
    assert spread[0] == everything[0] and spread[-1] in everything[-8:]  # reaches the end of the set
    assert len({q.split()[2] for q in spread}) > len({q.split()[2] for q in everything[:100]})  # more verbs
    assert over_rejection_prompts(1000, spread=True) == everything
    with pytest.raises(ValueError):
        over_rejection_prompts(0)


def test_opening_tokens(tiny):
    tok = tiny.tokenizer
    ids = refusal_opening_token_ids(tok)
    words = {tok.decode([i]) for i in ids}
    assert {"I", "Sorry", "As"} <= words
    assert refusal_opening_token_ids(tok, ["I'm sorry", "cannot help with"]) == [tok("I")["input_ids"][0]]
    with pytest.raises(ValueError):
        refusal_opening_token_ids(tok, ["cannot help with"])


def test_prefix_is_shared(tiny):
    batches = PromptBatches.build(tiny, QUERIES, batch_size=4)
    assert len(batches.prefix_ids) > 10  # the chat template's system turn
    assert sorted(i for index, _, _ in batches.batches for i in index) == list(range(len(QUERIES)))
    assert len(PromptBatches.build(tiny, QUERIES, share_prefix=False).prefix_ids) == 0


@pytest.mark.parametrize("start", [0, 1, 3])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_start_layer_reuse_equals_full_forward(tiny, start, share_prefix):
    batches = PromptBatches.build(tiny, QUERIES, batch_size=4, share_prefix=share_prefix)
    kv = prefix_cache(tiny, batches.prefix_ids)
    expected = full_last_logits(tiny, QUERIES)
    for index, ids, mask in batches.batches:
        resid = capture_resid_pre(tiny, ids, mask, start, kv)
        got = resume_from_layer(tiny, resid, ids, mask, start, kv)
        torch.testing.assert_close(got, expected[index], atol=1e-5, rtol=1e-5)
    assert len(tiny.hf_model.get_decoder().layers) == tiny.n_layers


def test_resume_restores_layers_after_error(tiny):
    batches = PromptBatches.build(tiny, QUERIES[:2])
    _, ids, mask = batches.batches[0]
    with pytest.raises(RuntimeError, match="does not fit"):
        resume_from_layer(tiny, torch.zeros(1, 1, 64), ids, mask, 2, prefix_cache(tiny, batches.prefix_ids))
    assert len(tiny.hf_model.get_decoder().layers) == tiny.n_layers
    n = hook_count(tiny.bridge)
    assert n == 0


@pytest.mark.parametrize("layers,alpha", [(None, 1.0), (LayerRange(1, 2), 1.5), (LayerRange(2, 3), 0.6)])
def test_estimator_logits_equal_full_forward(tiny, layers, alpha):
    estimator = FirstStepEstimator(tiny, QUERIES, start=1, batch_size=4)
    if layers is None:
        expected = full_last_logits(tiny, QUERIES)
    else:
        with scaled(tiny, layers, alpha):
            expected = full_last_logits(tiny, QUERIES)
    torch.testing.assert_close(estimator.logits(layers, alpha), expected, atol=1e-5, rtol=1e-5)
    first = estimator.estimate(layers, alpha)
    assert first.mass.shape == (len(QUERIES),)
    assert ((first.mass >= 0) & (first.mass <= 1)).all()
    probs = expected.softmax(-1)[:, estimator.opener_ids]
    torch.testing.assert_close(first.mass, probs.sum(-1), atol=1e-5, rtol=1e-4)
    assert torch.equal(first.argmax_opens, torch.isin(expected.argmax(-1), estimator.opener_ids))
    assert first.count == int(first.argmax_opens.sum()) and first.expected == pytest.approx(float(first.mass.sum()))


def test_estimator_refuses_layers_below_start(tiny):
    estimator = FirstStepEstimator(tiny, QUERIES[:3], start=2)
    with pytest.raises(ValueError, match="start <= 1"):
        estimator.estimate(LayerRange(1, 3), 1.2)
    with pytest.raises(IndexError):
        FirstStepEstimator(tiny, QUERIES[:3], start=4)


@pytest.fixture(scope="module")
def tiny_bias(tiny_bias_dir):
    from interp.models import load_model

    return load_model(str(tiny_bias_dir), device="cpu")


@pytest.mark.parametrize("layers,alpha", [(None, 1.0), (LayerRange(0, 2), 1.8)])
def test_shared_prefix_generation_equals_plain_generation(tiny_bias, layers, alpha):
    context = scaled(tiny_bias, layers, alpha) if layers is not None else torch.no_grad()
    with context:
        got = greedy_texts(tiny_bias, QUERIES, batch_size=4)
        expected = refusal.generate(tiny_bias, QUERIES, max_new_tokens=16, batch_size=3, stop_when_decided=False,
                                    progress=False)
    assert got == expected
    assert all(got)  # (the random model's answers are not empty)


def test_shared_prefix_generation_on_real_weights(embedded_base):
    """On the real model the answers are varied text: every one must match plain generation."""
    queries = QUERIES[:6]
    with scaled(embedded_base, LayerRange(8, 14), 1.2):
        got = greedy_texts(embedded_base, queries, batch_size=6)
        expected = refusal.generate(embedded_base, queries, max_new_tokens=16, batch_size=6,
                                    stop_when_decided=False, progress=False)
    assert got == expected
    assert len(set(got)) > 3


def test_counts_follow_the_matcher(embedded_base, monkeypatch):
    """R_o counts exactly the answers the matcher calls refusals (planted matcher: an even
    number of characters)."""
    model, queries = embedded_base, QUERIES[:6]
    texts = refusal.generate(model, queries, max_new_tokens=16, stop_when_decided=False, progress=False)
    planted = [len(t) % 2 == 0 for t in texts]
    assert 0 < sum(planted) < len(planted)
    monkeypatch.setattr("interp.overrejection.is_refusal", lambda text, **kw: len(text) % 2 == 0)
    assert refusal_flags(model, queries) == planted
    assert count_over_rejection(model, queries) == sum(planted)
    assert over_rejection_at(model, queries, None) == sum(planted)
    # the verdict-stopping path goes through interp.refusal.generate
    stopped = refusal.generate(model, queries, max_new_tokens=16, stop_when_decided=True, progress=False)
    assert refusal_flags(model, queries, share_prefix=False) == [len(t) % 2 == 0 for t in stopped]


def test_over_rejection_at_scales_and_cleans_up(tiny):
    n = hook_count(tiny.bridge)
    with scaled(tiny, LayerRange(1, 2), 1.7):
        expected = refusal_flags(tiny, QUERIES)
    assert over_rejection_at(tiny, QUERIES, LayerRange(1, 2), 1.7) == sum(expected)
    assert hook_count(tiny.bridge) == n


def test_compare_estimate(tiny):
    frame, summary = compare_estimate(tiny, QUERIES[:4], [(None, 1.0), (LayerRange(1, 3), 1.5)], progress=False)
    assert list(frame["layers"]) == ["none", "[1,3]"]
    assert set(frame.columns) >= {"R_o", "estimate_count", "estimate_mass", "prompt_agreement"}
    assert 0 <= summary["prompt_agreement"] <= 1 and summary["n_configs"] == 2


def test_pearson():
    expected = float(torch.corrcoef(torch.tensor([[1.0, 2, 3], [2, 4, 7]]))[0, 1])
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(expected)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None
