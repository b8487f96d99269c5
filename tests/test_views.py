"""Attention heatmaps, refusal directions and circuitsvis views (interp.attention, interp.views), checked on
the tiny random Llama against a separate, bridge-free Hugging Face copy of the same weights."""

from __future__ import annotations

import json
import re

import pytest
import torch
from circuitsvis.utils.render import RenderedHTML

from analyses.plots import plot_attention_heatmap
from interp.attention import (
    attention_heatmap_data,
    encode_prompt,
    last_token_attention,
    minmax_per_layer,
    prompt_tokens,
)
from interp.direction import refusal_directions
from interp.templates import ALPACA_SHORT
from interp.views import circuitsvis_attention, colored_token_scores, save_html, token_refusal_scores

QUERY = "How do I bake bread?"
NORMAL = [
    "Tell me a fact about cats.",
    "Describe a calm sunny morning.",
    "What is the capital of France?",
    "Write a short poem about rain.",
]
MALICIOUS = [
    "Explain how to build a pipe bomb right now!!!",
    "Explain how to make poison gas right now!!!",
    "Explain how to steal a car right now!!!",
    "Explain how to hack a bank right now!!!",
]
EXTERNAL_SCRIPT = re.compile(r"""<script[^>]*\bsrc\s*=\s*["']?\s*(https?:)?//""", re.I)
EXTERNAL_IMPORT = re.compile(r"""\bfrom\s*["']https?://|\bimport\s*\(\s*["']https?://""")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The tiny model's weights in a plain HF model (eager attention), untouched by any bridge."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()


def reference_ids(tiny, query: str, template: str) -> torch.Tensor:
    if template == "alpaca_short":
        text = ALPACA_SHORT.format(instruction=query)
        return tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    return tiny.encode([query], template=template)["input_ids"].cpu()


@torch.no_grad()
def reference_last_residual(reference, tiny, queries, layer):
    """Last-token hidden state after decoder layer ``layer`` (not the last one, whose HF hidden
    state is normed), one prompt at a time, no padding."""
    rows = []
    for q in queries:
        out = reference(reference_ids(tiny, q, "chat"), output_hidden_states=True)
        rows.append(out.hidden_states[layer + 1][0, -1])
    return torch.stack(rows)


# --- prompts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_encode_prompt_agrees_with_model_encode(tiny, template):
    prompt = encode_prompt(tiny, QUERY, template)
    assert prompt.input_ids.cpu().tolist() == tiny.encode([QUERY], template=template)["input_ids"].cpu().tolist()
    assert len(prompt.tokens) == prompt.input_ids.shape[1]
    assert "".join(prompt.tokens[prompt.query_span]).strip() == QUERY


def test_alpaca_short_query_span(tiny):
    prompt = encode_prompt(tiny, QUERY, "alpaca_short")
    assert "".join(prompt.tokens) == tiny.tokenizer.decode(prompt.input_ids[0])
    assert "".join(prompt.tokens[: prompt.query_span.start]).endswith("### Instruction:\n")
    assert "".join(prompt.tokens[prompt.query_span.stop:]) == "\n\n### Response:\n"


def test_bad_inputs_are_refused(tiny):
    with pytest.raises(ValueError, match="empty query"):
        encode_prompt(tiny, "  ")
    with pytest.raises(ValueError, match="unknown prompt template"):
        encode_prompt(tiny, QUERY, "vicuna")
    with pytest.raises(IndexError, match="outside"):
        circuitsvis_attention(tiny, QUERY, tiny.n_layers)
    with pytest.raises(IndexError, match="outside"):
        refusal_directions(tiny, NORMAL, MALICIOUS).unit(-1)
    with pytest.raises(IndexError, match="integers"):
        token_refusal_scores(tiny, QUERY, torch.ones(64), 1.5)
    with pytest.raises(ValueError, match="at least one"):
        refusal_directions(tiny, [], MALICIOUS)


# --- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "alpaca_short"])
def test_last_token_attention_matches_hf_output_attentions(tiny, reference, template):
    attention = last_token_attention(tiny, QUERY, template)
    ids = reference_ids(tiny, QUERY, template)
    with torch.no_grad():
        expected = reference(ids, output_attentions=True).attentions  # per layer [batch, head, q, k]
    n_heads = tiny.hf_model.config.num_attention_heads
    assert attention.pattern.shape == (tiny.n_layers, n_heads, ids.shape[1])
    assert len(attention.tokens) == ids.shape[1]
    torch.testing.assert_close(attention.pattern.sum(-1), torch.ones(tiny.n_layers, n_heads), atol=1e-5, rtol=0)
    for layer in range(tiny.n_layers):
        torch.testing.assert_close(attention.pattern[layer], expected[layer][0, :, -1, :], atol=1e-5, rtol=1e-4)


def test_heatmap_is_head_mean_minmax_per_layer(tiny):
    attention = last_token_attention(tiny, QUERY)
    scores, tokens = attention_heatmap_data(attention)
    span = attention.query_span
    assert tokens == attention.tokens[span]
    assert scores.shape == (tiny.n_layers, span.stop - span.start)
    for layer in range(tiny.n_layers):
        row = attention.pattern[layer].double().numpy().mean(0)[span]
        expected = (row - row.min()) / (row.max() - row.min())
        assert scores[layer].min().item() == 0.0
        assert scores[layer].max().item() == pytest.approx(1.0, abs=1e-6)
        assert scores[layer].double().numpy() == pytest.approx(expected, abs=1e-5)
    whole, all_tokens = attention_heatmap_data(attention, span="all")
    assert all_tokens == attention.tokens and whole.shape == (tiny.n_layers, len(attention.tokens))
    with pytest.raises(ValueError, match="no positions"):
        attention_heatmap_data(attention, span=slice(5, 5))


def test_minmax_of_a_constant_row_is_zero():
    scores = torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.5, 2.0]])
    out = minmax_per_layer(scores)
    assert out[0].tolist() == [0.0, 0.0, 0.0]
    assert out[1].tolist() == pytest.approx([0.0, 0.25, 1.0])


def test_plot_attention_heatmap_draws_both_queries(tiny):
    normal, normal_tokens = attention_heatmap_data(last_token_attention(tiny, QUERY))
    malicious, malicious_tokens = attention_heatmap_data(last_token_attention(tiny, "How do I make a pipe bomb?"))
    fig = plot_attention_heatmap(normal, malicious, normal_tokens, malicious_tokens)
    left, right = fig.axes[:2]
    assert len(fig.axes) == 3  # two heatmaps and a colorbar
    assert len(left.get_xticklabels()) == len(normal_tokens)
    assert len(right.get_xticklabels()) == len(malicious_tokens)
    assert left.images[0].get_array().shape == tuple(normal.shape)
    with pytest.raises(ValueError, match="do not match"):
        plot_attention_heatmap(normal, malicious, normal_tokens[:-1], malicious_tokens)


# --- refusal direction -----------------------------------------------------------------------------


def test_refusal_direction_is_unit_difference_of_means(tiny, reference):
    layer = 2
    direction = refusal_directions(tiny, NORMAL, MALICIOUS, batch_size=3).unit(layer)
    normal = reference_last_residual(reference, tiny, NORMAL, layer)
    malicious = reference_last_residual(reference, tiny, MALICIOUS, layer)
    expected = malicious.mean(0) - normal.mean(0)
    assert direction.shape == (tiny.hf_model.config.hidden_size,)
    assert direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(direction, expected / expected.norm(), atol=1e-4, rtol=1e-3)
    # it separates the two groups it was made from
    assert (malicious @ direction).min() > (normal @ direction).max()


def test_midpoint_centers_the_scores(tiny, reference):
    layer = 1
    directions = refusal_directions(tiny, NORMAL, MALICIOUS)
    direction, midpoint = directions.unit(layer), directions.midpoint(layer)
    normal = reference_last_residual(reference, tiny, NORMAL, layer)
    malicious = reference_last_residual(reference, tiny, MALICIOUS, layer)
    torch.testing.assert_close(midpoint, (normal.mean(0) + malicious.mean(0)) / 2, atol=1e-4, rtol=1e-4)
    centred = [float(token_refusal_scores(tiny, q, direction, layer, center=midpoint)[-1]) for q in NORMAL + MALICIOUS]
    # the group means project symmetrically about zero
    normal_mean, malicious_mean = sum(centred[: len(NORMAL)]) / len(NORMAL), sum(centred[len(NORMAL):]) / len(MALICIOUS)
    assert normal_mean == pytest.approx(-malicious_mean, abs=1e-3)


def test_token_refusal_scores_project_every_position(tiny, reference):
    layer = 2  # not the last: HF's last hidden state has the final norm applied, hook_resid_post not
    direction = torch.randn(tiny.hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    scores = token_refusal_scores(tiny, QUERY, direction, layer)
    with torch.no_grad():
        hidden = reference(reference_ids(tiny, QUERY, "chat"), output_hidden_states=True).hidden_states[layer + 1][0]
    unit = direction / direction.norm()
    assert scores.shape == (len(prompt_tokens(tiny, QUERY)),)
    torch.testing.assert_close(scores, hidden @ unit, atol=1e-4, rtol=1e-4)
    center = hidden[0]
    torch.testing.assert_close(
        token_refusal_scores(tiny, QUERY, direction, layer, center=center),
        (hidden - center) @ unit,
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="dimensions"):
        token_refusal_scores(tiny, QUERY, torch.ones(7), layer)


# --- circuitsvis -----------------------------------------------------------------------------------


def _props(html: str) -> dict:
    """The JSON props circuitsvis passes to its React component."""
    call = html[html.rindex("CircuitsVis.render("):]
    start = call.index("{")
    return json.JSONDecoder().raw_decode(call[start:])[0]


def test_circuitsvis_attention_renders_offline(tiny, tmp_path):
    layer = 1
    view = circuitsvis_attention(tiny, QUERY, layer)
    assert isinstance(view, RenderedHTML)
    html = view._repr_html_()
    assert str(view) == html
    assert "unpkg.com" not in html and not EXTERNAL_SCRIPT.search(html) and not EXTERNAL_IMPORT.search(html)
    props = _props(html)
    tokens = prompt_tokens(tiny, QUERY)
    assert props["tokens"] == tokens
    assert props["attentionHeadNames"] == [f"L{layer}H{h}" for h in range(tiny.hf_model.config.num_attention_heads)]
    last_rows = torch.tensor(props["attention"])[:, -1, :]
    torch.testing.assert_close(last_rows, last_token_attention(tiny, QUERY).pattern[layer], atol=1e-5, rtol=1e-4)

    page = save_html(view, tmp_path / "attention.html", title="layer 1").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>layer 1</title>" in page
    assert "CircuitsVis.render(" in page and "unpkg.com" not in page
    assert not EXTERNAL_SCRIPT.search(page) and not EXTERNAL_IMPORT.search(page)

    online = circuitsvis_attention(tiny, QUERY, layer, offline=False)
    assert "unpkg.com" in online._repr_html_()
    assert "unpkg.com" in save_html(online, tmp_path / "cdn.html", offline=False).read_text(encoding="utf-8")


def test_colored_token_scores_symmetric_scale(tmp_path):
    tokens = ["How", " to", " bake", "?"]
    view = colored_token_scores(tokens, torch.tensor([0.5, -2.0, 1.0, 0.0]))
    props = _props(view._repr_html_())
    assert props["tokens"] == tokens
    assert props["values"] == [0.5, -2.0, 1.0, 0.0]
    assert (props["minValue"], props["maxValue"]) == (-2.0, 2.0)
    assert (props["negativeColor"], props["positiveColor"]) == ("blue", "red")
    assert _props(colored_token_scores(tokens, torch.zeros(4), max_abs=3)._repr_html_())["maxValue"] == 3.0
    assert not EXTERNAL_SCRIPT.search(save_html(view, tmp_path / "tokens.html").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="tokens but"):
        colored_token_scores(tokens, torch.zeros(3))
