"""The one generation path (``interp.generation``): batched greedy decoding equals an
independent greedy loop (full forward pass per step, no KV cache, no ``generate``) on a private
copy of the ``tiny`` model whose LM head is untied and random (with the tied head a random Llama
just repeats its last input token, which would make every comparison trivially true); early
stopping and dropped rows keep every verdict."""

from __future__ import annotations

import pytest
import torch

from interp.generation import generate, generate_completions
from interp.judge import RefusalMatcher, is_refusal, normalize
from interp.models import load_model

PROMPTS = [
    "Tell me a long story about a dragon who loves to bake sourdough bread in the mountains.",
    "hi",
    "What is the capital of France, and why is it there?",
    "How to kill time?",
    "x",
    "Name three colours of the rainbow.",
    "Why?",
]


@pytest.fixture(scope="module")
def untied(tiny_dir):
    """A private copy of the tiny model with a random, untied LM head (varied greedy output)."""
    model = load_model(str(tiny_dir), device="cpu")
    head = model.hf_model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator))
    return model


@torch.no_grad()
def reference_greedy(model, query: str, n_tokens: int) -> list[int]:
    """Greedy decoding the slow, obvious way: one un-padded prompt, a full forward pass per token."""
    ids = model.encode([query])["input_ids"]
    out = []
    for _ in range(n_tokens):
        nxt = int(model.hf_model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_prompts_have_different_lengths(untied):
    lengths = untied.encode(PROMPTS)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) >= 5


def ids(completions) -> list[list[int]]:
    return [list(c.token_ids) for c in completions]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_batched_generation_equals_one_at_a_time_greedy(untied, share_prefix):
    n = 12
    kwargs = dict(max_new_tokens=n, share_prefix=share_prefix)
    batched = ids(generate_completions(untied, PROMPTS, batch_size=3, **kwargs))
    single = ids(generate_completions(untied, PROMPTS, batch_size=1, **kwargs))
    reference = [reference_greedy(untied, q, n) for q in PROMPTS]
    assert batched == single == reference  # token for token, in input order
    assert len({tuple(r) for r in reference}) > 1  # the prompts give different answers


def test_generation_equals_hf_generate_on_real_weights(embedded_base):
    """The project's decoding loop against ``hf_model.generate`` (greedy, batched, left-padded)
    on the real model, where answers end at their own end tokens."""
    queries = ["What is the capital of France?", "Name three fruits.", "How to kill time?", "Say yes."]
    ours = generate_completions(embedded_base, queries, max_new_tokens=20, batch_size=4)
    batch = embedded_base.encode(queries)
    with torch.no_grad():
        out = embedded_base.hf_model.generate(
            **batch, max_new_tokens=20, do_sample=False, temperature=None, top_p=None, top_k=None,
            repetition_penalty=None, eos_token_id=embedded_base.end_token_ids, pad_token_id=embedded_base.pad_token_id)
    stops = set()
    for completion, row in zip(ours, out[:, batch["input_ids"].shape[1]:].tolist()):
        cut = next((k for k, t in enumerate(row) if t in embedded_base.end_token_ids), len(row))
        assert list(completion.token_ids) == row[:cut]
        assert completion.stop == ("end" if cut < len(row) else "length")
        stops.add(completion.stop)
    assert stops == {"end", "length"}  # both ways of stopping were exercised


def test_results_come_back_in_input_order(untied):
    kwargs = dict(max_new_tokens=6, batch_size=2)
    forward = generate(untied, PROMPTS, **kwargs)
    permutation = [4, 0, 6, 2, 1, 5, 3]
    permuted = generate(untied, [PROMPTS[i] for i in permutation], **kwargs)
    assert permuted == [forward[i] for i in permutation]
    assert generate(untied, []) == []


def test_stop_when_decided_past_window_gives_prefix_of_full_generation(untied):
    n, matcher = 40, RefusalMatcher(window=30)
    full = generate_completions(untied, PROMPTS, max_new_tokens=n, batch_size=3)
    early = generate_completions(untied, PROMPTS, max_new_tokens=n, batch_size=3, decided=matcher.decided)
    for f, e in zip(full, early):
        assert f.token_ids[: len(e.token_ids)] == e.token_ids
        assert e.stop == "decided" and len(normalize(e.text)) >= matcher.window  # it stopped because it was decided
        assert matcher.is_refusal(e.text) == matcher.is_refusal(f.text)
    assert all(len(e.token_ids) < len(f.token_ids) for e, f in zip(early, full))


def test_stop_when_decided_on_refusal_stops_at_the_phrase_and_drops_the_row(untied):
    n = 24
    full = generate_completions(untied, PROMPTS, max_new_tokens=n, batch_size=len(PROMPTS))
    target = 2
    words = normalize(full[target].text).split(" ")
    phrase = " ".join(words[1:3])  # a "refusal phrase" taken from the middle of one answer
    others = [i for i in range(len(PROMPTS)) if i != target and phrase not in normalize(full[i].text)]
    assert others
    matcher = RefusalMatcher(phrases=[phrase], window=10_000, exceptions=(), apologies=())
    early = generate_completions(untied, PROMPTS, max_new_tokens=n, batch_size=len(PROMPTS), decided=matcher.decided)
    row = early[target]
    assert full[target].token_ids[: len(row.token_ids)] == row.token_ids
    assert row.stop == "decided" and len(row.token_ids) < n
    assert phrase in normalize(row.text)
    # one token fewer and the phrase is not complete yet: it stopped at the first chance
    assert phrase not in normalize(untied.tokenizer.decode(row.token_ids[:-1], skip_special_tokens=True))
    for i in others:  # the rows left in the (smaller) batch run to the end unchanged
        assert early[i].token_ids == full[i].token_ids


def test_generation_sees_bridge_hooks(untied):
    """Hooks passed in or active outside fire in the prefix, the prefill and every decode step."""
    n, calls = 8, []

    def amplify(resid, hook):
        calls.append(hook.name)
        return resid * 4.0

    hooks = [("blocks.1.hook_resid_post", amplify)]
    kwargs = dict(max_new_tokens=n, batch_size=3)
    plain = ids(generate_completions(untied, PROMPTS, **kwargs))
    passed = ids(generate_completions(untied, PROMPTS, fwd_hooks=hooks, **kwargs))
    with untied.bridge.hooks(fwd_hooks=hooks):
        outside = ids(generate_completions(untied, PROMPTS, **kwargs))
        reference = [reference_greedy(untied, q, n) for q in PROMPTS]
    assert calls
    assert passed == outside == reference
    assert passed != plain


def test_bad_arguments(untied):
    with pytest.raises(ValueError):
        generate(untied, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate(untied, ["hi"], batch_size=0)
    with pytest.raises(TypeError):
        generate(untied, [["hi"]])


def test_embedded_base_answers_a_benign_query(embedded_base):
    [answer] = generate(embedded_base, ["What is the capital of France?"], max_new_tokens=12)
    assert answer and answer.isascii()
    assert "paris" in answer.lower()
    assert "<|im_end|>" not in answer and "assistant" not in answer.lower()
    assert not is_refusal(answer)


def test_generation_ignores_sampling_settings_of_the_model(untied):
    """A generation_config that asks for sampling (as Llama-3's does) must not leak in."""
    from transformers import GenerationConfig

    saved = untied.hf_model.generation_config
    untied.hf_model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.3,
        no_repeat_ngram_size=2, bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
    )
    queries = [PROMPTS[i] for i in (3, 4, 6)]  # answers that repeat themselves under greedy decoding
    try:
        got = ids(generate_completions(untied, queries, max_new_tokens=12))
        batch = untied.encode(queries)
        with torch.no_grad():  # what the model's settings would give, even with sampling off
            leaked = untied.hf_model.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=2)
    finally:
        untied.hf_model.generation_config = saved
    reference = [reference_greedy(untied, q, 12) for q in queries]
    assert got == reference
    assert leaked[:, batch["input_ids"].shape[1]:].tolist() != reference  # the check has teeth


@pytest.mark.parametrize("q_len,k_len", [(1, 9), (5, 5), (3, 11)])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_grouped_eager_attention_equals_transformers_eager(q_len, k_len, softcap):
    """The plain twin's attention against transformers' own eager one (Gemma-2's, which has
    soft-capping; the other families' differ only in lacking it), with a causal mask, grouped
    query heads (8 query heads over 2 key/value heads) and a padded row."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from interp.forward import grouped_eager_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, head_dim=16, training=False)
    query = torch.randn(2, 8, q_len, 16)
    key, value = torch.randn(2, 2, k_len, 16), torch.randn(2, 2, k_len, 16)
    low = torch.finfo(torch.float32).min  # what transformers' eager mask uses
    mask = torch.zeros(2, 1, q_len, k_len)
    mask[:, :, :, k_len - q_len:] = torch.triu(torch.full((q_len, q_len), low), diagonal=1)
    mask[1, :, :, :2] = low  # a left-padded row
    expected_out, expected_w = eager_attention_forward(module, query, key, value, mask, scaling=0.25, softcap=softcap)
    out, weights = grouped_eager_attention(module, query, key, value, mask, scaling=0.25, softcap=softcap)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-5)
    assert out.shape == (2, q_len, 8, 16)


def test_generate_and_judge_labels_equal_judging_full_answers_by_hand(untied):
    """``interp.answers.generate_and_judge``: without early stop its texts and labels are the plain
    generation's judged one by one; with early stop every binary verdict is the same."""
    from interp.answers import generate_and_judge

    n = 24
    full = generate_completions(untied, PROMPTS, max_new_tokens=n, batch_size=3)
    phrase = " ".join(normalize(full[2].text).split(" ")[1:3])
    matcher = RefusalMatcher(phrases=[phrase], window=10_000, exceptions=(), apologies=())
    by_hand = [matcher.classify(c.text) for c in full]
    assert 0 < sum(label != "compliance" for label in by_hand) < len(PROMPTS)  # both verdicts occur
    whole = generate_and_judge(untied, PROMPTS, judge=matcher, max_new_tokens=n, early_stop=False, batch_size=3)
    assert [a.text for a in whole] == [c.text for c in full]
    assert [a.label for a in whole] == by_hand and [a.query for a in whole] == PROMPTS
    early = generate_and_judge(untied, PROMPTS, judge=matcher, max_new_tokens=n, batch_size=3)
    assert [a.refused for a in early] == [label != "compliance" for label in by_hand]
    assert any(len(e.text) < len(w.text) for e, w in zip(early, whole))  # it did stop early somewhere
