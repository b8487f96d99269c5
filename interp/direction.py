"""A refusal direction per layer (Arditi et al., 2024), its separation, and two interventions.

**The direction.**  At each layer, the difference of the mean last-prompt-token residual
(``hook_resid_post``, ``interp.activations.capture_last_token_resid``) of harmful and benign
requests: ``refusal_directions(model, benign, harmful)`` for any two query lists;
``fit_directions(model, pairs)`` for the **train** pairs (it refuses test pairs: they evaluate
it).  ``resid_post`` of layer ``l`` is ``resid_pre`` of layer ``l + 1``, Arditi et al.'s site.
``RefusalDirections.midpoint(layer)`` is halfway between the two means, the centre that makes a
projection's sign say which group it is nearer (``interp.views.token_refusal_scores``).

**Separation** (``separation``): on held-out pairs, each prompt's last-token ``resid_post`` at
layer ``l`` projected on layer ``l``'s unit direction; per layer the AUROC of harmful over benign,
the mean projection of each side and their gap in pooled standard deviations.

**Interventions** (TransformerLens hooks on the bridge, for ``generate(..., fwd_hooks=...)`` or
``interp.patching.prompt_log_odds``):

- *directional ablation* (``ablation_hooks``): ``x <- x - (x . r) r`` (``r`` the unit
  direction) at every position, on ``hook_resid_pre`` of every layer and on every layer's
  attention and MLP outputs, as Arditi et al. do: then no residual the model computes has a
  component along ``r``;
- *activation addition* (``addition_hooks``): ``x <- x + c r`` at every position of one layer's
  ``hook_resid_post`` (where the direction was measured), with ``c`` the difference of the
  harmful and benign mean projections on ``r`` (the norm of the difference of means: on average
  a benign activation is moved to the harmful mean's projection).

**The direction's best layer** (``select_layer``) is chosen on the **validation** pairs, never
the test pairs, by Arditi et al.'s rule on the first answer token: per candidate layer, the mean
refusal log-odds of the validation harmful requests with that layer's direction ablated (lower:
the direction carries more of the refusal), of the validation benign requests with it added
(higher: it induces refusal), and the mean KL divergence of the benign requests' next-token
distribution from clean to ablated (large: the ablation breaks the model rather than removing
refusal; a low-layer direction can be mostly a token-identity or outlier direction).  Layers in
the last 20% are not candidates; the eligible ones are those whose addition raises the benign
log-odds above their clean level and whose ablation KL is at most ``max_kl`` (0.1); among them
the lowest ablation log-odds wins.  When no candidate's addition raises the benign log-odds that
filter is dropped; when none of the rest has a KL within ``max_kl`` the bound is doubled until one
does (a 135M model moves more under any ablation than Arditi et al.'s 1.8B-72B ones); the
criterion says which.  ``intervention_rates`` then measures
refusal by generation on the test pairs with that layer's direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from interp.activations import capture_last_token_resid
from interp.data import prompts_hash
from interp.hooks import hook_name
from interp.models import LoadedModel
from interp.patching import prompt_last_logits, prompt_log_odds, refusal_metric
from interp.ranges import check_layer, check_layers
from interp.stats import Rate, auroc

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
"""Where ``ablation_hooks`` project the direction out, at every layer (Arditi et al.)."""

ADDITION_SITE = "resid_post"


def _check_part(pairs, allowed: tuple[str, ...], what: str) -> list:
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"{what} needs at least one pair")
    wrong = sorted({p.part for p in pairs if getattr(p, "part", None) not in allowed})
    if wrong:
        raise ValueError(f"{what} takes {' or '.join(allowed)} pairs only, got {', '.join(map(str, wrong))} pairs "
                         "(the test pairs evaluate the direction and must not shape it)")
    return pairs


@dataclass
class RefusalDirections:
    """Per layer, the mean last-token ``resid_post`` of harmful and of benign requests."""

    model: str
    harmful_mean: Float[Tensor, "layer d_model"]
    benign_mean: Float[Tensor, "layer d_model"]
    pair_ids: list[str]

    @property
    def n_layers(self) -> int:
        return self.harmful_mean.shape[0]

    @property
    def difference(self) -> Float[Tensor, "layer d_model"]:
        """Difference of means, harmful minus benign."""
        return self.harmful_mean - self.benign_mean

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        """Layer ``layer``'s direction, unit length."""
        diff = self.difference[check_layer(layer, self.n_layers)]
        norm = diff.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"harmful and benign means coincide at layer {layer}: no direction")
        return diff / norm

    def midpoint(self, layer: int) -> Float[Tensor, " d_model"]:
        """Halfway between the harmful and benign means at ``layer``."""
        layer = check_layer(layer, self.n_layers)
        return (self.harmful_mean[layer] + self.benign_mean[layer]) / 2

    def scale(self, layer: int) -> float:
        """Mean harmful minus mean benign projection on the unit direction (= its norm)."""
        return float(self.difference[check_layer(layer, self.n_layers)].norm())

    def to_dict(self) -> dict:
        return {"model": self.model, "site": "hook_resid_post, last prompt token", "n_pairs": len(self.pair_ids),
                "pairs_hash": prompts_hash(self.pair_ids), "norm": self.difference.norm(dim=-1).tolist()}


def refusal_directions(model: LoadedModel, benign: list[str], harmful: list[str], *, batch_size: int = 16,
                       template: str | None = None, pair_ids: list[str] | None = None) -> RefusalDirections:
    """Difference-of-means directions at every layer from ``benign`` and ``harmful`` queries."""
    benign, harmful = list(benign), list(harmful)
    if not benign or not harmful:
        raise ValueError("refusal_directions needs at least one benign and one harmful query")
    acts = capture_last_token_resid(model, harmful + benign, batch_size=batch_size, template=template,
                                    progress=False)
    n = len(harmful)
    return RefusalDirections(str(getattr(model, "spec", "model")), acts[:n].mean(0), acts[n:].mean(0),
                             list(pair_ids or []))


def fit_directions(model: LoadedModel, pairs, *, batch_size: int = 16, template: str | None = None) -> RefusalDirections:
    """``refusal_directions`` of the benign and harmful sides of ``pairs`` (train pairs only)."""
    pairs = _check_part(pairs, ("train",), "fit_directions")
    return refusal_directions(model, [p.benign for p in pairs], [p.harmful for p in pairs], batch_size=batch_size,
                              template=template, pair_ids=[p.pair_id for p in pairs])


def separation_from_acts(directions: RefusalDirections, harmful: Float[Tensor, "prompt layer d_model"],
                         benign: Float[Tensor, "prompt layer d_model"]) -> pd.DataFrame:
    """Per layer: AUROC of harmful over benign projections on the layer's unit direction, the
    mean projections, and their gap in pooled standard deviations (``d``)."""
    rows = []
    for layer in range(directions.n_layers):
        unit = directions.unit(layer)
        h, b = (harmful[:, layer] @ unit).numpy(), (benign[:, layer] @ unit).numpy()
        pooled = np.sqrt((h.var(ddof=1) + b.var(ddof=1)) / 2) if min(len(h), len(b)) > 1 else float("nan")
        rows.append({"layer": layer, "auroc": auroc(h, b), "harmful_projection": float(h.mean()),
                     "benign_projection": float(b.mean()), "gap": float(h.mean() - b.mean()),
                     "d": float((h.mean() - b.mean()) / pooled) if pooled else float("nan")})
    return pd.DataFrame(rows)


def separation(model: LoadedModel, directions: RefusalDirections, pairs, *, batch_size: int = 16,
               template: str | None = None) -> pd.DataFrame:
    """``separation_from_acts`` on held-out ``pairs`` (validation or test)."""
    pairs = _check_part(pairs, ("validation", "test"), "separation")
    acts = capture_last_token_resid(model, [p.harmful for p in pairs] + [p.benign for p in pairs],
                                    batch_size=batch_size, template=template, progress=False)
    return separation_from_acts(directions, acts[:len(pairs)], acts[len(pairs):])


# --- interventions -----------------------------------------------------------------------------


def _ablate(unit: Tensor):
    def hook(value, hook):
        r = unit.to(device=value.device, dtype=value.dtype)
        return value - (value @ r)[..., None] * r

    return hook


def _add(vector: Tensor):
    def hook(value, hook):
        return value + vector.to(device=value.device, dtype=value.dtype)

    return hook


def ablation_hooks(direction: Float[Tensor, " d_model"], n_layers: int, sites=ABLATION_SITES) -> list:
    """Hooks projecting ``direction`` (normalised here) out at every position of ``sites`` of
    every layer."""
    unit = direction / direction.norm()
    return [(hook_name(site, layer), _ablate(unit)) for layer in range(n_layers) for site in sites]


def addition_hooks(direction: Float[Tensor, " d_model"], layer: int, coeff: float, site: str = ADDITION_SITE) -> list:
    """A hook adding ``coeff`` times the unit ``direction`` at every position of ``site`` at
    ``layer``."""
    unit = direction / direction.norm()
    return [(hook_name(site, layer), _add(coeff * unit))]


def direction_ablation(model: LoadedModel, directions: RefusalDirections, layer: int) -> list:
    """``ablation_hooks`` of layer ``layer``'s direction over the whole model."""
    return ablation_hooks(directions.unit(layer), model.n_layers)


def direction_addition(model: LoadedModel, directions: RefusalDirections, layer: int) -> list:
    """``addition_hooks`` of layer ``layer``'s direction, scaled by ``directions.scale(layer)``."""
    check_layer(layer, model.n_layers)
    return addition_hooks(directions.unit(layer), layer, directions.scale(layer))


# --- choosing the layer ------------------------------------------------------------------------


@dataclass
class LayerSelection:
    """The direction's best layer and the validation scores it was chosen by."""

    layer: int
    criterion: str
    table: pd.DataFrame  # per candidate: ablation / addition log-odds, eligible
    clean_harmful: float
    clean_benign: float
    pair_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "criterion": self.criterion, "clean_harmful": self.clean_harmful,
                "clean_benign": self.clean_benign, "n_pairs": len(self.pair_ids),
                "pairs_hash": prompts_hash(self.pair_ids), "table": self.table.to_dict(orient="records")}


def _log_softmax(logits: Tensor) -> Tensor:
    return logits.float().log_softmax(-1)


def select_layer(model: LoadedModel, directions: RefusalDirections, pairs, *, candidates=None, max_layer_frac: float = 0.8,
                 max_kl: float = 0.1, batch_size: int = 32, template: str | None = None) -> LayerSelection:
    """Choose the direction's layer on validation ``pairs`` (module docstring).  ``candidates``:
    the layers to try (default every layer below ``max_layer_frac`` of the depth)."""
    pairs = _check_part(pairs, ("validation",), "select_layer")
    if candidates is None:
        candidates = [layer for layer in range(model.n_layers) if layer < max_layer_frac * model.n_layers] or [0]
    candidates = check_layers(candidates, model.n_layers)
    harmful, benign = [p.harmful for p in pairs], [p.benign for p in pairs]
    kwargs = dict(batch_size=batch_size, template=template)
    clean_h = float(prompt_log_odds(model, harmful, **kwargs).mean())
    clean_logp = prompt_last_logits(model, benign, reduce=_log_softmax, **kwargs)
    clean_b = float(refusal_metric(model)(clean_logp).mean())
    rows = []
    for layer in candidates:
        ablate = direction_ablation(model, directions, layer)
        ablated = float(prompt_log_odds(model, harmful, ablate, **kwargs).mean())
        ablated_logp = prompt_last_logits(model, benign, ablate, reduce=_log_softmax, **kwargs)
        kl = float((clean_logp.exp() * (clean_logp - ablated_logp)).sum(-1).mean())
        added = float(prompt_log_odds(model, benign, direction_addition(model, directions, layer), **kwargs).mean())
        rows.append({"layer": layer, "ablation_harmful": ablated, "addition_benign": added,
                     "ablation_benign_kl": kl, "induces": added > clean_b, "kl_ok": kl <= max_kl})
    table = pd.DataFrame(rows)
    pool = table[table["induces"]] if table["induces"].any() else table
    finite = pool[np.isfinite(pool["ablation_benign_kl"])]
    limit = max_kl
    if finite.empty:
        eligible, limit = pool, float("inf")
    else:
        while not (finite["ablation_benign_kl"] <= limit).any():
            limit *= 2
        eligible = finite[finite["ablation_benign_kl"] <= limit]
    best = int(eligible.loc[eligible["ablation_harmful"].idxmin(), "layer"])
    criterion = (f"lowest mean refusal log-odds of {len(pairs)} validation harmful requests with the direction "
                 f"ablated, among layers {candidates[0]}..{candidates[-1]}"
                 + (" whose addition raises the validation benign log-odds and" if table["induces"].any() else "")
                 + f" whose ablation moves the benign next-token distribution by KL <= {limit:g}")
    if limit > max_kl:
        criterion += f" (none within KL {max_kl:g}; the bound was doubled until one was)"
    if not table["induces"].any():
        criterion += " (no candidate's addition raised the benign log-odds; that filter was dropped)"
    return LayerSelection(best, criterion, table, clean_h, clean_b, [p.pair_id for p in pairs])


# --- refusal by generation ---------------------------------------------------------------------


@dataclass
class InterventionRates:
    """Refusal by generation of harmful and benign requests: clean, direction ablated, added."""

    model: str
    layer: int
    refused: dict[str, dict[str, list[bool]]]  # condition -> side -> per pair
    answers: dict[str, dict[str, list[str]]]
    pair_ids: list[str]
    max_new_tokens: int

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"condition": condition, "side": side, **Rate(sum(flags), len(flags)).to_dict()}
                             for condition, sides in self.refused.items() for side, flags in sides.items()])

    def to_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "n_pairs": len(self.pair_ids),
                "pairs_hash": prompts_hash(self.pair_ids), "max_new_tokens": self.max_new_tokens,
                "rates": self.to_frame().to_dict(orient="records")}


def intervention_rates(model: LoadedModel, directions: RefusalDirections, layer: int, pairs, *, max_new_tokens: int = 24,
                       batch_size: int = 32, judge=None, template: str | None = None) -> InterventionRates:
    """Generate answers to the harmful and benign sides of ``pairs`` clean, with layer
    ``layer``'s direction ablated everywhere, and with it added at that layer; judge each."""
    from interp.answers import generate_and_judge
    from interp.judge import DEFAULT_JUDGE

    judge = judge or DEFAULT_JUDGE
    pairs = list(pairs)
    conditions = {"clean": [], "ablation": direction_ablation(model, directions, layer),
                  "addition": direction_addition(model, directions, layer)}
    sides = {"harmful": [p.harmful for p in pairs], "benign": [p.benign for p in pairs]}
    refused, answers = {}, {}
    for condition, hooks in conditions.items():
        refused[condition], answers[condition] = {}, {}
        for side, queries in sides.items():
            judged = generate_and_judge(model, queries, judge=judge, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, fwd_hooks=hooks, template=template)
            answers[condition][side] = [a.text for a in judged]
            refused[condition][side] = [a.refused for a in judged]
    return InterventionRates(str(getattr(model, "spec", "model")), layer, refused, answers,
                             [p.pair_id for p in pairs], max_new_tokens)


# --- everything --------------------------------------------------------------------------------


@dataclass
class DirectionResult:
    """Directions (train), separation (test), the chosen layer (validation), rates (test)."""

    directions: RefusalDirections
    separation: pd.DataFrame
    selection: LayerSelection
    rates: InterventionRates | None

    @property
    def layer(self) -> int:
        return self.selection.layer

    def to_dict(self) -> dict:
        return {"directions": self.directions.to_dict(), "separation": self.separation.to_dict(orient="records"),
                "selection": self.selection.to_dict(), "rates": self.rates.to_dict() if self.rates else None}


def direction_analysis(model: LoadedModel, train, validation, test, *, candidates=None, generation_pairs: int | None = None,
                       max_new_tokens: int = 24, batch_size: int = 16, template: str | None = None) -> DirectionResult:
    """Fit on ``train``, choose the layer on ``validation``, measure separation on ``test`` and
    refusal by generation on the first ``generation_pairs`` test pairs (0: skip generation)."""
    directions = fit_directions(model, train, batch_size=batch_size, template=template)
    test = _check_part(test, ("test", "validation"), "direction_analysis's evaluation")
    table = separation(model, directions, test, batch_size=batch_size, template=template)
    selection = select_layer(model, directions, validation, candidates=candidates, template=template)
    rates = None
    if generation_pairs != 0:
        subset = test if generation_pairs is None else test[:generation_pairs]
        rates = intervention_rates(model, directions, selection.layer, subset, max_new_tokens=max_new_tokens,
                                   template=template)
    return DirectionResult(directions, table, selection, rates)


__all__ = [
    "ABLATION_SITES", "DirectionResult", "InterventionRates", "LayerSelection", "RefusalDirections",
    "ablation_hooks", "addition_hooks", "direction_ablation", "direction_addition", "direction_analysis",
    "fit_directions", "intervention_rates", "refusal_directions", "select_layer", "separation", "separation_from_acts",
]
