"""R_o (interp.overrejection): the evaluator's shared prefix, reused lower layers, early stop and
first-step estimate, each against an independent full computation."""

from __future__ import annotations

import pytest
import torch

from interp.estimate import FirstStep, pearson, refusal_opening_token_ids
from interp.forward import PromptBatches, prefix_cache, resume_from_layer
from interp.generation import generate_completions
from interp.judge import DEFAULT_JUDGE
from interp.overrejection import (
    RoEvaluator,
    compare_estimate,
    over_rejection,
    over_rejection_prompts,
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


def full_generation_flags(model, queries, max_new_tokens=16):
    """Reference verdicts: plain full-length greedy generation (no early stop, no reuse)."""
    texts = [c.text for c in generate_completions(model, queries, max_new_tokens=max_new_tokens, batch_size=3,
                                                  share_prefix=False)]
    return [DEFAULT_JUDGE.is_refusal(t) for t in texts], texts


def test_prompts_subset():
    everything = over_rejection_prompts()
    assert len(everything) == 731
    assert over_rejection_prompts(3) == everything[:3]
    spread = over_rejection_prompts(100, "spread")
    assert len(spread) == len(set(spread)) == 100 and set(spread) <= set(everything)
    assert spread[0] == everything[0] and spread[-1] in everything[-8:]  # reaches the end of the set
    assert len({q.split()[2] for q in spread}) > len({q.split()[2] for q in everything[:100]})  # more verbs
    assert over_rejection_prompts(1000, "spread") == everything
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
    assert sorted(i for b in batches.batches for i in b.index) == list(range(len(QUERIES)))
    assert len(PromptBatches.build(tiny, QUERIES, share_prefix=False).prefix_ids) == 0


def test_resume_restores_layers_after_error(tiny):
    batches = PromptBatches.build(tiny, QUERIES[:2])
    batch = batches.batches[0]
    with pytest.raises(RuntimeError, match="does not fit"):
        resume_from_layer(tiny, torch.zeros(1, 1, 64), batch.ids, batch.mask, 2, prefix_cache(tiny, batches.prefix_ids))
    assert len(tiny.hf_model.get_decoder().layers) == tiny.n_layers
    assert hook_count(tiny.bridge) == 0


@pytest.mark.parametrize("start", [0, 1, 3])
@pytest.mark.parametrize("layers,alpha", [(None, 1.0), (LayerRange(3, 3), 1.5)])
def test_estimate_equals_the_full_forward(tiny, start, layers, alpha):
    evaluator = RoEvaluator(tiny, QUERIES, start=start, batch_size=4)
    if layers is None:
        expected = full_last_logits(tiny, QUERIES)
    else:
        with scaled(tiny, layers, alpha):
            expected = full_last_logits(tiny, QUERIES)
    first = evaluator.estimate(layers, alpha)
    reference = FirstStep.from_logits(expected, evaluator.opener_ids)
    torch.testing.assert_close(first.mass, reference.mass, atol=1e-5, rtol=1e-4)
    assert torch.equal(first.argmax_opens, reference.argmax_opens)
    assert len(tiny.hf_model.get_decoder().layers) == tiny.n_layers


@pytest.fixture(scope="module")
def tiny_bias(tiny_bias_dir):
    from interp.models import load_model

    return load_model(str(tiny_bias_dir), device="cpu")


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("layers,alpha", [(None, 1.0), (LayerRange(2, 3), 1.8)])
def test_evaluator_verdicts_equal_plain_full_generation(tiny_bias, start, layers, alpha):
    evaluator = RoEvaluator(tiny_bias, QUERIES, start=start, batch_size=4)
    with scaled(tiny_bias, layers, alpha) if layers is not None else torch.no_grad():
        expected, texts = full_generation_flags(tiny_bias, QUERIES)
    result = evaluator.evaluate(layers, alpha)
    assert result.flags.tolist() == expected
    for got, full in zip(result.texts, texts):  # early-stopped answers are prefixes of the full ones
        assert full.startswith(got)
    assert all(texts)  # (the random model's answers are not empty)


def test_evaluator_on_real_weights_agrees_with_full_generation_and_stops_early(embedded):
    """Real answers, some refused: verdicts match plain generation per prompt, and most refused rows
    (those with a strong decline the judge can decide on) stop before the 16th token."""
    queries = over_rejection_prompts(24, "spread")
    evaluator = RoEvaluator(embedded, queries, start=7, batch_size=12)
    with scaled(embedded, LayerRange(7, 9), 1.2):
        expected, texts = full_generation_flags(embedded, queries)
    result = evaluator.evaluate(LayerRange(7, 9), 1.2)
    assert result.flags.tolist() == expected
    refused = [t for t, f in zip(result.texts, expected) if f]
    assert refused and sum(len(embedded.tokenizer(t)["input_ids"]) < 16 for t in refused) >= len(refused) / 2
    assert 0 < sum(expected) < len(expected)


def test_evaluator_decodes_on_the_twin_unless_another_bridge_hook_is_attached(tiny):
    """The decode steps run on the plain twin (bridge wrappers skipped); a user's own bridge hook,
    which would not fire there, keeps them on the bridge, where it sees every step."""
    evaluator = RoEvaluator(tiny, QUERIES[:4], start=1, batch_size=4)
    twin_calls, bridge_steps = [], []
    handle = tiny.plain_twin().get_decoder().register_forward_hook(lambda m, a, out: twin_calls.append(1))
    try:
        plain = evaluator.evaluate(LayerRange(2, 3), 1.8)
        assert twin_calls  # decoded on the twin
        twin_calls.clear()

        def watch(resid, hook):
            if resid.shape[1] == 1:
                bridge_steps.append(1)

        with tiny.bridge.hooks(fwd_hooks=[(f"blocks.{tiny.n_layers - 1}.hook_resid_post", watch)]):
            hooked = evaluator.evaluate(LayerRange(2, 3), 1.8)
    finally:
        handle.remove()
    assert not twin_calls and bridge_steps
    assert hooked.texts == plain.texts and torch.equal(hooked.flags, plain.flags)
    assert hook_count(tiny.bridge) == 0


def test_evaluator_refuses_layers_below_start(tiny):
    evaluator = RoEvaluator(tiny, QUERIES[:3], start=2)
    with pytest.raises(ValueError, match="start <= 1"):
        evaluator.estimate(LayerRange(1, 3), 1.2)
    with pytest.raises(IndexError):
        RoEvaluator(tiny, QUERIES[:3], start=4)


def test_counts_follow_the_judge(embedded_base):
    """R_o counts exactly the answers the judge calls refusals (a planted judge: an even number
    of characters; it never decides early)."""

    class Planted:
        openers = DEFAULT_JUDGE.openers

        @staticmethod
        def classify(text):
            return "full_refusal" if len(text) % 2 == 0 else "compliance"

        @staticmethod
        def is_refusal(text):
            return len(text) % 2 == 0

        @staticmethod
        def decided(text):
            return False

    model, queries = embedded_base, QUERIES[:6]
    texts = [c.text for c in generate_completions(model, queries, max_new_tokens=16)]
    planted = [len(t) % 2 == 0 for t in texts]
    assert 0 < sum(planted) < len(planted)
    assert over_rejection(model, queries, judge=Planted) == sum(planted)
    assert over_rejection(model, queries, None, 1.3, judge=Planted) == sum(planted)  # no layers: alpha unused
    assert RoEvaluator(model, queries, judge=Planted).count() == sum(planted)


def test_over_rejection_scales_and_cleans_up(tiny):
    n = hook_count(tiny.bridge)
    with scaled(tiny, LayerRange(1, 2), 1.7):
        expected, _ = full_generation_flags(tiny, QUERIES)
    assert over_rejection(tiny, QUERIES, LayerRange(1, 2), 1.7) == sum(expected)
    assert hook_count(tiny.bridge) == n


def test_compare_estimate(tiny):
    evaluator = RoEvaluator(tiny, QUERIES[:4], start=1)
    frame, summary = compare_estimate(evaluator, [(None, 1.0), (LayerRange(1, 3), 1.5)], progress=False)
    assert list(frame["layers"]) == ["none", "[1,3]"]
    assert set(frame.columns) >= {"R_o", "estimate_count", "estimate_mass", "prompt_agreement"}
    assert 0 <= summary["prompt_agreement"] <= 1 and summary["n_configs"] == 2


def test_pearson():
    expected = float(torch.corrcoef(torch.tensor([[1.0, 2, 3], [2, 4, 7]]))[0, 1])
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(expected)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None
