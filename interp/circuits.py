"""Per-layer views of one prompt: last-token attention heatmaps (the paper's §3.6) and
per-token "refusal direction" scores, drawn with matplotlib or circuitsvis.

Attention heatmap (Li et al. §3.6, App. A.5; ``Code/Attention_scores/att_scores.py``).
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
    plot_attention_heatmap(normal_scores, malicious_scores, normal_tokens, malicious_tokens) -> Figure

Refusal direction (not in the paper, which has no probing; a standard difference-in-means
direction, cf. Arditi et al. 2024).  ``refusal_direction`` is the unit vector along
``mean(malicious) - mean(normal)`` of the last-token residual ``blocks.{layer}.hook_resid_post``
(captured by ``interp.activations.capture_last_token_resid``: left-padded batches, last *real*
token).  ``token_refusal_scores`` projects every position's residual at that layer onto it,
optionally minus the midpoint of the two means so that 0 is the boundary between the groups.

circuitsvis views, offline.  circuitsvis builds two HTML strings for every view: one that
imports its JS bundle from unpkg (``str(view)``, ``view.show_code()``) and one that inlines the
bundle shipped in the wheel (``circuitsvis/dist/cdn/iife.js``, ~1.3 MB; no further network
requests).  Its own ``_repr_html_`` picks the inline one only after a 1 s probe of google.com
fails.  The views here return an ``OfflineHTML`` (a ``RenderedHTML`` subclass) that always uses
the inline bundle when ``offline=True`` (the default), in notebooks and in ``str()`` alike, and
``save_html`` writes a self-contained page.  Each inline view weighs ~1.3 MB, so keep a
notebook's views few, or store it without outputs.  Where JavaScript does not run (GitHub's
notebook preview, nbconvert to PDF) the views are blank: the matplotlib heatmap
(``plot_attention_heatmap``) and ``plot_token_scores`` are the static fallback.
"""

from __future__ import annotations

import html
import operator
from pathlib import Path
from typing import NamedTuple

import torch
from circuitsvis.attention import attention_heads
from circuitsvis.tokens import colored_tokens
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from interp.io import atomic_write_text
from interp.models import PromptTooLongError
from interp.templates import check_template, format_prompt

PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"  # [batch, head, query_pos, key_pos]
RESID_HOOK = "blocks.{layer}.hook_resid_post"  # [batch, pos, d_model]

# alpaca-lora's templates/alpaca_short.json, used by the paper's attention-score script
ALPACA_SHORT = "### Instruction:\n{instruction}\n\n### Response:\n"
VIEW_TEMPLATES = ("chat", "alpaca", "alpaca_short")


class LastTokenAttention(NamedTuple):
    """Attention from the last prompt position, with the prompt's tokens."""

    pattern: Float[Tensor, "layer head key_pos"]
    tokens: list[str]
    query_span: slice  # the positions of the user's query inside the formatted prompt


class EncodedPrompt(NamedTuple):
    input_ids: Tensor  # [1, pos] on the model's device
    tokens: list[str]
    query_span: slice


# --- prompts ----------------------------------------------------------------------------------


def prompt_text(model, query: str, template: str | None = None) -> str:
    """The prompt the model sees for ``query``: ``chat``, ``alpaca`` or the paper's ``alpaca_short``."""
    template = template or model.template
    if template == "alpaca_short":
        return ALPACA_SHORT.format(instruction=query)
    check_template(template)
    return format_prompt(model.tokenizer, query, template)


def encode_prompt(model, query: str, template: str | None = None) -> EncodedPrompt:
    """Tokenise one query like ``LoadedModel.encode`` (special tokens only for the Alpaca
    templates), and find which tokens hold the query itself (by character offsets)."""
    if not query or not query.strip():
        raise ValueError("empty query")
    template = template or model.template
    if template not in VIEW_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(VIEW_TEMPLATES)}")
    text = prompt_text(model, query, template)
    tok = model.tokenizer
    enc = tok(text, add_special_tokens=(template != "chat"), return_offsets_mapping=True)
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


def prompt_tokens(model, query: str, template: str | None = None) -> list[str]:
    """The prompt's tokens as text, one string per position."""
    return encode_prompt(model, query, template).tokens


def _check_layer(layer: int, n_layers: int) -> int:
    try:
        layer = operator.index(layer)
    except TypeError:
        raise IndexError(f"layer must be an integer, got {layer!r}") from None
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer!r} is outside this model's layers 0..{n_layers - 1}")
    return layer


# --- attention ----------------------------------------------------------------------------------


@torch.no_grad()
def attention_patterns(model, input_ids: Tensor, layers: list[int]) -> Float[Tensor, "layer head query_pos key_pos"]:
    """Full attention patterns of one prompt (batch of one) at the given layers, on the CPU."""
    names = [PATTERN_HOOK.format(layer=i) for i in layers]
    _, cache = model.bridge.run_with_cache(input_ids, names_filter=lambda name: name in names)
    return torch.stack([cache[name][0] for name in names]).float().cpu()


def last_token_attention(model, query: str, template: str | None = None) -> LastTokenAttention:
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


def _label(token: str) -> str:
    """A token as a readable tick label: newlines and tabs escaped, a blank token made visible."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else text.replace(" ", "␣") or "∅"


def plot_attention_heatmap(
    normal: Float[Tensor, "layer key_pos"],
    malicious: Float[Tensor, "layer key_pos"],
    normal_tokens: list[str],
    malicious_tokens: list[str],
    titles: tuple[str, str] = ("normal query", "malicious query"),
    cmap: str = "Reds",
):
    """Two heatmaps side by side: layers down (0 at the top), tokens across."""
    from matplotlib.figure import Figure

    for scores, tokens, name in ((normal, normal_tokens, "normal"), (malicious, malicious_tokens, "malicious")):
        if scores.ndim != 2 or scores.shape[1] != len(tokens):
            raise ValueError(f"{name}: scores of shape {tuple(scores.shape)} do not match {len(tokens)} tokens")
    widths = [max(3, len(normal_tokens)), max(3, len(malicious_tokens))]
    n_layers = normal.shape[0]
    fig = Figure(figsize=(2 + 0.35 * sum(widths), 1.5 + 0.18 * n_layers), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True, width_ratios=widths)
    for ax, scores, tokens, title in zip(axes, (normal, malicious), (normal_tokens, malicious_tokens), titles):
        values = scores.float().cpu().numpy()
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(tokens)), [_label(t) for t in tokens], rotation=90, fontsize=8)
        ax.set_title(title)
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention from last position (min–max per layer)")
    return fig


# --- refusal direction --------------------------------------------------------------------------


def refusal_direction(
    model,
    normal_queries: list[str],
    malicious_queries: list[str],
    layer: int,
    template: str | None = None,
    batch_size: int = 16,
    return_midpoint: bool = False,
):
    """Unit vector along mean(malicious) - mean(normal) of the last-token ``hook_resid_post`` at
    ``layer``: ``Float[Tensor, "d_model"]``.  With ``return_midpoint`` also the point halfway
    between the two means, ``(direction, midpoint)``; pass it as ``center`` to
    ``token_refusal_scores`` so that a score of 0 is the boundary between the two groups (the raw
    projection carries a large offset shared by both groups).  ``template`` is ``"chat"`` or
    ``"alpaca"`` (the capture formats with ``interp.templates``, which has no ``alpaca_short``)."""
    from interp.activations import capture_last_token_resid

    layer = _check_layer(layer, model.n_layers)
    if not normal_queries or not malicious_queries:
        raise ValueError("refusal_direction needs at least one normal and one malicious query")

    def mean_residual(queries):
        acts = capture_last_token_resid(
            model, list(queries), batch_size=batch_size, template=template, layers=[layer], progress=False
        )
        return acts[:, 0].mean(0)

    normal_mean, malicious_mean = mean_residual(normal_queries), mean_residual(malicious_queries)
    difference = malicious_mean - normal_mean
    norm = difference.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"the two groups have the same mean residual at layer {layer}; no direction")
    direction = difference / norm
    if return_midpoint:
        return direction, (normal_mean + malicious_mean) / 2
    return direction


@torch.no_grad()
def token_refusal_scores(
    model,
    query: str,
    direction: Float[Tensor, "d_model"],
    layer: int,
    template: str | None = None,
    center: Float[Tensor, "d_model"] | None = None,
) -> Float[Tensor, "pos"]:
    """Projection of each position's residual (``blocks.{layer}.hook_resid_post``), minus
    ``center`` if given, onto the unit vector along ``direction``; positions as in
    ``prompt_tokens(model, query, template)``."""
    layer = _check_layer(layer, model.n_layers)
    if direction.ndim != 1 or direction.norm() == 0:
        raise ValueError(f"direction must be a non-zero vector [d_model], got shape {tuple(direction.shape)}")
    prompt = encode_prompt(model, query, template)
    name = RESID_HOOK.format(layer=layer)
    _, cache = model.bridge.run_with_cache(prompt.input_ids, names_filter=lambda n: n == name)
    resid = cache[name][0].float().cpu()
    if resid.shape[-1] != direction.shape[0]:
        raise ValueError(f"direction has {direction.shape[0]} dimensions, the residual {resid.shape[-1]}")
    if center is not None:
        resid = resid - center.float().cpu()
    unit = direction.float().cpu() / direction.float().cpu().norm()
    return resid @ unit


def plot_token_scores(tokens: list[str], scores: Float[Tensor, "pos"], title: str = "", ax=None):
    """A static bar chart of per-token scores (the fallback where circuitsvis cannot run)."""
    from matplotlib.figure import Figure

    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    fig = None
    if ax is None:
        fig = Figure(figsize=(1 + 0.3 * len(tokens), 2.5), layout="constrained")
        ax = fig.subplots()
    values = scores.float().cpu().numpy()
    ax.bar(range(len(tokens)), values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
    ax.set_xticks(range(len(tokens)), [_label(t) for t in tokens], rotation=90, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(title)
    return fig if fig is not None else ax.figure


# --- circuitsvis, offline -----------------------------------------------------------------------


class OfflineHTML(RenderedHTML):
    """A circuitsvis view that always shows the JS bundle inlined from the wheel when
    ``offline`` is set (in notebooks and in ``str()``), and the unpkg one otherwise."""

    def __init__(self, local_src: str, cdn_src: str, offline: bool = True):
        super().__init__(local_src, cdn_src)
        self.offline = offline

    def _repr_html_(self) -> str:
        return self.local_src if self.offline else self.cdn_src

    def __str__(self) -> str:
        return self._repr_html_()


def offline_html(rendered: RenderedHTML, offline: bool = True) -> OfflineHTML:
    """Wrap a circuitsvis ``RenderedHTML`` so it uses the inline bundle (``offline``) or the CDN."""
    return OfflineHTML(rendered.local_src, rendered.cdn_src, offline)


def circuitsvis_attention(
    model, query: str, layer: int, template: str | None = None, offline: bool = True
) -> OfflineHTML:
    """circuitsvis ``attention_heads`` view of every head of one layer over the prompt's tokens."""
    layer = _check_layer(layer, model.n_layers)
    prompt = encode_prompt(model, query, template)
    pattern = attention_patterns(model, prompt.input_ids, [layer])[0]
    names = [f"L{layer}H{h}" for h in range(pattern.shape[0])]
    view = attention_heads(attention=pattern, tokens=prompt.tokens, attention_head_names=names, mask_upper_tri=True)
    return offline_html(view, offline)


def colored_token_scores(
    tokens: list[str], scores: Float[Tensor, "pos"], max_abs: float | None = None, offline: bool = True
) -> OfflineHTML:
    """circuitsvis ``colored_tokens``: red for positive scores, blue for negative (circuitsvis's
    default is the reverse), on a scale
    symmetric about zero (``max_abs``, default the largest |score|) so views can share one scale."""
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    values = scores.float().cpu()
    bound = float(max_abs if max_abs is not None else values.abs().max().clamp_min(1e-12))
    view = colored_tokens(
        tokens=list(tokens), values=values, min_value=-bound, max_value=bound,
        negative_color="blue", positive_color="red",
    )
    return offline_html(view, offline)


def save_html(rendered, path: str | Path, title: str = "circuitsvis view", offline: bool = True) -> Path:
    """Write a view (a circuitsvis ``RenderedHTML`` or an HTML string) as a standalone page.
    With ``offline`` the JS bundle is inlined, so the page needs no network."""
    if isinstance(rendered, str):
        body = rendered
    else:
        body = rendered.local_src if offline else rendered.cdn_src
    page = (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    return atomic_write_text(path, page)
