"""Token-level views: per-token "refusal direction" scores, and circuitsvis views that render
offline.

Token refusal scores: ``token_refusal_scores`` projects every position's residual
``hook_resid_post`` at a layer onto a direction (the refusal direction of
``interp.direction.refusal_directions``), optionally minus a centre (``RefusalDirections.midpoint``)
so that 0 is the boundary between the groups.

circuitsvis views, offline.  circuitsvis builds two HTML strings for every view: one that
imports its JS bundle from unpkg (``str(view)``, ``view.show_code()``) and one that inlines the
bundle shipped in the wheel (``circuitsvis/dist/cdn/iife.js``, ~1.3 MB; no further network
requests).  Its own ``_repr_html_`` picks the inline one only after a 1 s probe of google.com
fails.  The views here return an ``OfflineHTML`` (a ``RenderedHTML`` subclass) that always uses
the inline bundle when ``offline=True`` (the default), in notebooks and in ``str()`` alike, and
``save_html`` writes a self-contained page.  Each inline view weighs ~1.3 MB, so keep a
notebook's views few, or store it without outputs.  Where JavaScript does not run (GitHub's
notebook preview, nbconvert to PDF) the views are blank: the matplotlib heatmap
(``analyses.plots.plot_attention_heatmap``) and ``analyses.plots.plot_token_scores`` are the static
fallback.
"""

from __future__ import annotations

import html
from pathlib import Path

from circuitsvis.attention import attention_heads
from circuitsvis.tokens import colored_tokens
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from interp.attention import attention_patterns, encode_prompt
from interp.hooks import hook_name
from interp.io import atomic_write_text
from interp.models import LoadedModel
from interp.ranges import check_layer


def token_refusal_scores(
    model: LoadedModel,
    query: str,
    direction: Float[Tensor, " d_model"],
    layer: int,
    template: str | None = None,
    center: Float[Tensor, " d_model"] | None = None,
) -> Float[Tensor, " pos"]:
    """Projection of each position's residual (``blocks.{layer}.hook_resid_post``), minus
    ``center`` if given, onto the unit vector along ``direction``; positions as in
    ``prompt_tokens(model, query, template)``."""
    layer = check_layer(layer, model.n_layers)
    if direction.ndim != 1 or direction.norm() == 0:
        raise ValueError(f"direction must be a non-zero vector [d_model], got shape {tuple(direction.shape)}")
    prompt = encode_prompt(model, query, template)
    name = hook_name("resid_post", layer)  # [batch, pos, d_model]
    _, cache = model.bridge.run_with_cache(prompt.input_ids, names_filter=lambda n: n == name)
    resid = cache[name][0].float().cpu()
    if resid.shape[-1] != direction.shape[0]:
        raise ValueError(f"direction has {direction.shape[0]} dimensions, the residual {resid.shape[-1]}")
    if center is not None:
        resid = resid - center.float().cpu()
    unit = direction.float().cpu() / direction.float().cpu().norm()
    return resid @ unit


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
    layer = check_layer(layer, model.n_layers)
    prompt = encode_prompt(model, query, template)
    pattern = attention_patterns(model, prompt.input_ids, [layer])[0]
    names = [f"L{layer}H{h}" for h in range(pattern.shape[0])]
    view = attention_heads(attention=pattern, tokens=prompt.tokens, attention_head_names=names, mask_upper_tri=True)
    return offline_html(view, offline)


def colored_token_scores(
    tokens: list[str], scores: Float[Tensor, " pos"], max_abs: float | None = None, offline: bool = True
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

