"""Last-token attention heatmaps (the paper's §3.6, App. A.5; ``Code/Attention_scores/att_scores.py``).

For each layer, the attention *from the last prompt position* to every position, averaged over
heads, then min–max normalised within the layer.  The official code formats the query with
alpaca-lora's ``alpaca_short`` template (``### Instruction:\\n{q}\\n\\n### Response:\\n``) and,
before normalising, cuts the template off both ends of the row with a slice hard-coded per
tokenizer (``x[6:-8]``, ``x[5:-6]`` for gemma), to keep the instruction's own tokens.  We find
those tokens by character offsets instead, so the cut holds for any tokenizer and template
(``span="query"``, the default; ``span="all"`` keeps every position, where the first token's
attention sink usually flattens everything else to zero).  From such heatmaps the authors read
three stages: early layers attend to syntax, the safety layers to the malicious words, later
layers to semantics.

    last_token_attention(model, query)   -> LastTokenAttention(pattern [layer head key_pos], tokens, query_span)
    attention_heatmap_data(attention)    -> ([layer key_pos] scores in [0, 1], tokens)

The figure of two such heatmaps is ``analyses.plots.plot_attention_heatmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from interp.hooks import hook_name
from interp.models import LoadedModel, PromptTooLongError
from interp.templates import adds_bos, format_prompt


class LastTokenAttention(NamedTuple):
    """Attention from the last prompt position, with the prompt's tokens."""

    pattern: Float[Tensor, "layer head key_pos"]
    tokens: list[str]
    query_span: slice  # the positions of the user's query inside the formatted prompt


class EncodedPrompt(NamedTuple):
    input_ids: Tensor  # [1, pos] on the model's device
    tokens: list[str]
    query_span: slice


def prompt_text(model: LoadedModel, query: str, template: str | None = None) -> str:
    """The prompt the model sees for ``query``: ``chat``, ``alpaca`` or the paper's ``alpaca_short``."""
    return format_prompt(model.tokenizer, query, template or model.template)


def encode_prompt(model: LoadedModel, query: str, template: str | None = None) -> EncodedPrompt:
    """Tokenise one query like ``LoadedModel.encode`` (special tokens only for the Alpaca
    templates), and find which tokens hold the query itself (by character offsets)."""
    if not query or not query.strip():
        raise ValueError("empty query")
    template = template or model.template
    text = prompt_text(model, query, template)
    tok = model.tokenizer
    enc = tok(text, add_special_tokens=adds_bos(template), return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) > model.n_ctx:
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens, over the model's context of {model.n_ctx}: {query[:60]!r}"
        )
    needle = query if query in text else query.strip()  # some chat templates trim the message
    if needle not in text:
        raise ValueError(f"the {template!r} template rewrote the query, so its tokens cannot be found")
    start = text.rindex(needle)
    end = start + len(needle)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > start and s < end and e > s]
    query_span = slice(inside[0], inside[-1] + 1)
    tokens = [tok.decode([i]) for i in ids]
    return EncodedPrompt(torch.tensor([ids], device=model.device), tokens, query_span)


def prompt_tokens(model: LoadedModel, query: str, template: str | None = None) -> list[str]:
    """The prompt's tokens as text, one string per position."""
    return encode_prompt(model, query, template).tokens


def attention_patterns(model: LoadedModel, input_ids: Tensor, layers: list[int]) -> Float[Tensor, "layer head query_pos key_pos"]:
    """Full attention patterns of one prompt (batch of one) at the given layers, on the CPU."""
    names = [hook_name("pattern", i) for i in layers]  # [batch, head, query_pos, key_pos]
    _, cache = model.bridge.run_with_cache(input_ids, names_filter=lambda name: name in names)
    return torch.stack([cache[name][0] for name in names]).float().cpu()


def last_token_attention(model: LoadedModel, query: str, template: str | None = None) -> LastTokenAttention:
    """Attention weights from the last prompt position to every position, for every layer and
    head (``blocks.{i}.attn.hook_pattern``, whose layout is [batch, head, query_pos, key_pos])."""
    prompt = encode_prompt(model, query, template)
    patterns = attention_patterns(model, prompt.input_ids, list(range(model.n_layers)))
    return LastTokenAttention(patterns[:, :, -1, :], prompt.tokens, prompt.query_span)


def minmax_per_layer(scores: Float[Tensor, "layer pos"]) -> Float[Tensor, "layer pos"]:
    """Rescale each layer's row to [0, 1]; a constant row becomes all zeros."""
    low = scores.min(dim=-1, keepdim=True).values
    high = scores.max(dim=-1, keepdim=True).values
    width = high - low
    scaled = (scores - low) / width.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(width > 0, scaled, torch.zeros_like(scores))


def attention_heatmap_data(
    attention: LastTokenAttention, span: str | slice = "query"
) -> tuple[Float[Tensor, "layer key_pos"], list[str]]:
    """The paper's view: head-averaged last-token attention, restricted to ``span`` (``"query"``:
    the query's tokens, as the official code's slice; ``"all"``; or a slice of positions), then
    min–max normalised per layer.  Returns the scores and the tokens they belong to."""
    if span == "query":
        span = attention.query_span
    elif span == "all":
        span = slice(None)
    elif not isinstance(span, slice):
        raise ValueError(f"span must be 'query', 'all' or a slice, got {span!r}")
    averaged = attention.pattern.mean(dim=1)[:, span]
    tokens = attention.tokens[span]
    if averaged.shape[-1] == 0:
        raise ValueError(f"span {span} holds no positions of this {len(attention.tokens)}-token prompt")
    return minmax_per_layer(averaged), tokens


def token_label(token: str) -> str:
    """A token as a readable tick label: newlines and tabs escaped, a blank token made visible."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else text.replace(" ", "␣") or "∅"
