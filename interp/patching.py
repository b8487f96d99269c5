"""Activation patching of refusal at the last prompt position, layer by layer.

For paired harmful/benign requests (``interp.data.load_pairs``: the same sentence frame), write
one activation of the harmful run into the benign run at the **last prompt position** (the one
that predicts the first answer token) and measure how far the answer's opening moves towards a
refusal; and the reverse (benign into harmful).  Sites (TransformerLens hook names on the
bridge): the residual stream (``hook_resid_pre`` / ``hook_resid_post``), the attention output
(``hook_attn_out``) and the MLP output (``hook_mlp_out``) of each layer.

**Metric.**  The refusal log-odds of the first answer token,
``log p_open - log(1 - p_open)``, where ``p_open`` is the probability the next-token
distribution puts on the tokens that open a refusal (``interp.estimate.
refusal_opening_token_ids``); computed as ``logsumexp(open) - logsumexp(rest)`` so neither
side underflows.

**Normalisation.**  Per pair, ``fraction = (patched - target_clean) / (source_clean -
target_clean)``: the share of the clean gap the patch moves the target run towards the source
run.  For harmful -> benign this is the familiar ``(patched - benign) / (harmful - benign)``
(1: the patch alone makes the benign request look as refused as the harmful one); for
benign -> harmful it is the share of the harmful run's refusal the patch removes.  Pairs whose
clean gap is below ``min_gap`` are left out of the per-pair mean (their ratio is noise); the
ratio of means ``mean change / mean gap`` uses every pair.

**Why it is cheap.**  Patching only the last position changes nothing before it (causal
attention), so every earlier position's keys and values are those of the clean target run.  Each
batch of target prompts is therefore run once without its last token (after the shared prefix,
``interp.forward``); the cache is then repeated for every site patched at one layer ``L`` and only
the last token is run again, one row per (site, prompt), and only through layers ``L..``: below
``L`` the patched run *is* the clean run, so it starts from the clean last-position residual
entering ``L`` (recorded by the clean last step; the decoder's layer list is cut as in
``interp.forward.resume_from_layer``).  A whole layer sweep so costs about half a forward of one
token per prompt and patch, instead of one full forward per prompt and patch
(``benchmarks/patching.py``).  With left padding the last prompt position is column -1 of every
row, in both runs.

**Generation.**  ``patched_refusal_rates`` patches the residual at the last prompt position
during the prefill only (``PrefillPatch``; the decode steps run unpatched but attend to the
patched position's keys and values) and judges the greedy answers (``interp.judge``).  A patch
can only flip a verdict where the clean verdicts differ, so with ``contrast_only`` it runs on the
pairs whose harmful request is refused and benign request answered (both generated first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.estimate import refusal_log_odds, refusal_opening_token_ids
from interp.forward import Batch, PromptBatches, broadcast_cache, layers_from, position_ids, prefix_cache, run_decoder
from interp.hooks import hook_name
from interp.models import LoadedModel
from interp.ranges import check_layers
from interp.stats import Rate

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
"""Patchable sites (TransformerLens names; ``interp.hooks.hook_name(site, layer)`` is the hook)."""

DEFAULT_SITES = ("resid_post", "attn_out", "mlp_out")
DIRECTIONS = ("harmful->benign", "benign->harmful")
"""``source->target``: whose activation is written into whose run."""

Metric = Callable[[Tensor], Tensor]


def check_directions(directions) -> list[str]:
    directions = [directions] if isinstance(directions, str) else list(directions)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions or len(set(directions)) != len(directions):
        raise ValueError(f"directions must be distinct values of {DIRECTIONS}, got {directions}")
    return directions


def check_sites(sites) -> list[str]:
    sites = [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct values of {tuple(SITES)}, got {sites}")
    return sites


# --- the metric --------------------------------------------------------------------------------


def refusal_metric(model: LoadedModel) -> Metric:
    """``logits -> refusal log-odds`` with this model's refusal-opening tokens."""
    opener = torch.tensor(refusal_opening_token_ids(model.tokenizer))
    return lambda logits: refusal_log_odds(logits, opener)


@torch.no_grad()
def prompt_last_logits(model: LoadedModel, queries: list[str], fwd_hooks=(), *, reduce: Metric | None = None,
                       batch_size: int = 32, template: str | None = None) -> Tensor:
    """``reduce(logits)`` (default: the float32 logits) of each query's first answer token,
    with ``fwd_hooks`` active for the whole forward (the shared prefix included), stacked in the
    caller's order on the CPU."""
    reduce = reduce or (lambda logits: logits.float())
    prompts = PromptBatches.build(model, queries, template=template, batch_size=batch_size)
    out: Tensor | None = None
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        kv = prefix_cache(model, prompts.prefix_ids)
        for batch in prompts.batches:
            hidden = run_decoder(model, batch.ids, batch.mask, kv).last_hidden_state
            values = reduce(model.hf_model.lm_head(hidden[:, -1])).cpu()
            if out is None:
                out = torch.empty((prompts.n_prompts, *values.shape[1:]), dtype=values.dtype)
            out[batch.index] = values
    return out


def prompt_log_odds(model: LoadedModel, queries: list[str], fwd_hooks=(), *, batch_size: int = 32,
                    template: str | None = None) -> Float[Tensor, " prompt"]:
    """The refusal log-odds of each query's first answer token, with ``fwd_hooks`` active for
    the whole forward (the shared prefix included), in the caller's order."""
    return prompt_last_logits(model, queries, fwd_hooks, reduce=refusal_metric(model), batch_size=batch_size,
                              template=template)


# --- hooks -------------------------------------------------------------------------------------


def last_position_hook(values: Float[Tensor, "batch d_model"], rows: slice = slice(None)):
    """A hook that writes ``values`` at the last position of rows ``rows`` (a copy; the input
    is never modified in place)."""

    def hook(value, hook):
        out = value.clone()
        out[rows, -1] = values.to(device=out.device, dtype=out.dtype)
        return out

    return hook


class PrefillPatch:
    """Hook for ``generate_completions(..., prompts=prompts, fwd_hooks=[(name, PrefillPatch(...))])``:
    writes ``values[i]`` at the last prompt position of query ``i`` during each batch's prefill,
    and leaves the decode steps (one position per row) alone.

    ``prompts`` must be built without a shared prefix (``share_prefix=False``), so the only
    multi-position forwards are the batches' prefills, which ``generate_completions`` runs in
    ``prompts.batches`` order; each prefill takes the next batch's rows."""

    def __init__(self, prompts: PromptBatches, values: Float[Tensor, "prompt d_model"]):
        if prompts.n_prefix:
            raise ValueError("PrefillPatch needs prompts built with share_prefix=False")
        if len(values) != prompts.n_prompts:
            raise ValueError(f"{len(values)} values for {prompts.n_prompts} prompts")
        if any(batch.ids.shape[1] < 2 for batch in prompts.batches):
            raise ValueError("a batch of one-token prompts cannot be told from a decode step")
        self.values = values
        self.pending: list[Batch] = list(prompts.batches)

    def __call__(self, value, hook):
        if value.shape[1] == 1:
            return value  # a decode step
        if not self.pending:
            raise RuntimeError("PrefillPatch saw more prefills than there are batches")
        batch = self.pending.pop(0)
        if tuple(value.shape[:2]) != (len(batch.index), batch.ids.shape[1]):
            raise RuntimeError(f"prefill of shape {tuple(value.shape[:2])} does not match the next batch "
                               f"({len(batch.index)} x {batch.ids.shape[1]})")
        return last_position_hook(self.values[batch.index])(value, hook)


# --- the batched sweep -------------------------------------------------------------------------


@dataclass
class LastPositionRun:
    """One prompt set run clean, and optionally patched: the metric per prompt, the clean
    activations at the last position per (site, layer), and the patched metric per job."""

    clean: Tensor  # [prompt, ...] metric of the clean run
    acts: dict[tuple[str, int], Float[Tensor, "prompt d_model"]]  # clean last-position activations
    patched: Tensor | None  # [job, prompt, ...] metric of each patched run


def _kv_of(cache) -> list[tuple[Tensor, Tensor]] | None:
    if cache is None:
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def _repeat_cache(model, kv, times: int):
    if kv is None:
        return None
    from transformers import DynamicCache

    return DynamicCache([(k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for k, v in kv], config=model.config)


@torch.no_grad()
def _last_step(model, batch: Batch, kv, times: int, fwd_hooks, start: int = 0,
               resid_pre: Tensor | None = None) -> Float[Tensor, "row vocab"]:
    """Run each row's last token ``times`` times over (row order: copy-major) after the cached
    earlier positions ``kv``; return the next-token logits.  With ``start > 0`` only layers
    ``start..`` run, on ``resid_pre`` (``[rows, d_model]``, the last position's residual entering
    layer ``start``, repeated ``times`` over)."""
    mask = batch.mask.repeat(times, 1)
    hooks = list(fwd_hooks)
    if start:
        entering = resid_pre.repeat(times, 1)[:, None]

        def inject(value, hook):
            return entering.to(device=value.device, dtype=value.dtype)

        hooks.insert(0, (hook_name("resid_pre", start), inject))
    with layers_from(model, start), model.bridge.hooks(fwd_hooks=hooks):
        hidden = model.decoder()(
            input_ids=batch.ids[:, -1:].repeat(times, 1),
            attention_mask=mask,
            position_ids=position_ids(mask)[:, -1:],
            past_key_values=_repeat_cache(model, kv, times),
            use_cache=kv is not None,
        ).last_hidden_state
    return model.hf_model.lm_head(hidden[:, -1])


@torch.no_grad()
def _earlier_positions(model, batch: Batch, prefix_kv) -> list[tuple[Tensor, Tensor]] | None:
    """Keys and values of every position but the last (shared prefix included)."""
    if batch.ids.shape[1] == 1:
        return None if prefix_kv is None else _kv_of(broadcast_cache(model, prefix_kv, len(batch.index)))
    out = run_decoder(model, batch.ids[:, :-1], batch.mask[:, :-1], prefix_kv, use_cache=True)
    return _kv_of(out.past_key_values)


@torch.no_grad()
def run_last_position(
    model: LoadedModel,
    queries: list[str],
    metric: Metric,
    capture: Sequence[tuple[str, int]] = (),
    jobs: Sequence[tuple[str, int]] = (),
    sources: dict[tuple[str, int], Tensor] | None = None,
    *,
    batch_size: int = 16,
    max_rows: int = 512,
    template: str | None = None,
    progress: bool = False,
) -> LastPositionRun:
    """Run ``queries`` clean, recording ``metric(logits)`` at the last prompt position and the
    last-position activation of every ``(site, layer)`` in ``capture``; then, for every job
    ``(site, layer)``, the same prompts with ``sources[(site, layer)][i]`` written at that hook's
    last position of prompt ``i`` (module docstring: the earlier positions are computed once;
    the jobs of one layer re-run the last token from that layer on, up to ``max_rows`` (job,
    prompt) rows per forward).  ``metric`` maps ``[rows, vocab]`` logits to per-row values
    (the refusal log-odds, or the logits themselves)."""
    jobs = list(jobs)
    if jobs and sources is None:
        raise ValueError("patching jobs need source activations")
    for job in jobs:
        if job not in sources:
            raise ValueError(f"no source activations for {job}")
    if len(set(jobs)) != len(jobs):
        raise ValueError("a (site, layer) job is listed twice")
    capture = list(dict.fromkeys(capture))
    starts = sorted({layer for _, layer in jobs if layer > 0})  # layers the patched rows start at
    reads = list(dict.fromkeys(capture + [("resid_pre", layer) for layer in starts]))
    prompts = PromptBatches.build(model, queries, template=template, batch_size=batch_size)
    n = prompts.n_prompts
    clean: Tensor | None = None
    patched: Tensor | None = None
    acts = {key: None for key in capture}
    kv_prefix = prefix_cache(model, prompts.prefix_ids)
    bar = tqdm(total=n * (1 + len(jobs)), desc="patch", unit="row", disable=not progress)
    for batch in prompts.batches:
        index = torch.tensor(batch.index)
        rows = len(batch.index)
        kv = _earlier_positions(model, batch, kv_prefix)
        found: dict[tuple[str, int], Tensor] = {}

        def reader(key, found=found):
            def hook(value, hook):
                found[key] = value[:, -1].detach().float().cpu()
                return value

            return hook

        values = metric(_last_step(model, batch, kv, 1, [(hook_name(*key), reader(key)) for key in reads])).cpu()
        if clean is None:
            clean = torch.empty((n, *values.shape[1:]), dtype=values.dtype)
        clean[index] = values
        for key in capture:
            if acts[key] is None:
                acts[key] = torch.empty(n, found[key].shape[-1])
            acts[key][index] = found[key]
        bar.update(rows)
        per_forward = max(1, max_rows // rows)
        for layer in sorted({layer for _, layer in jobs}):
            group = [k for k, job in enumerate(jobs) if job[1] == layer]
            for first in range(0, len(group), per_forward):
                chunk = group[first:first + per_forward]
                hooks = [
                    (hook_name(*jobs[k]), last_position_hook(sources[jobs[k]][index], slice(j * rows, (j + 1) * rows)))
                    for j, k in enumerate(chunk)
                ]
                entering = found[("resid_pre", layer)] if layer > 0 else None
                values = metric(_last_step(model, batch, kv, len(chunk), hooks, layer, entering)).cpu()
                values = values.reshape(len(chunk), rows, *values.shape[1:])
                if patched is None:
                    patched = torch.empty((len(jobs), n, *values.shape[2:]), dtype=values.dtype)
                patched[torch.tensor(chunk)[:, None], index[None]] = values
                bar.update(rows * len(chunk))
    bar.close()
    return LastPositionRun(clean, acts, patched)


# --- the result --------------------------------------------------------------------------------


@dataclass
class PatchingResult:
    """Refusal log-odds of every pair, clean and patched per direction, site and layer."""

    model: str
    pair_ids: list[str]
    sites: list[str]
    layers: list[int]
    directions: list[str]
    harmful_clean: Float[Tensor, " pair"]
    benign_clean: Float[Tensor, " pair"]
    patched: Float[Tensor, "direction site layer pair"]
    min_gap: float = 0.5
    settings: dict = field(default_factory=dict)

    def clean(self, side: str) -> Float[Tensor, " pair"]:
        return {"harmful": self.harmful_clean, "benign": self.benign_clean}[side]

    @property
    def gap(self) -> Float[Tensor, " pair"]:
        """Clean harmful minus clean benign log-odds, per pair."""
        return self.harmful_clean - self.benign_clean

    def _slot(self, direction: str, site: str) -> Float[Tensor, "layer pair"]:
        return self.patched[self.directions.index(direction), self.sites.index(site)]

    def change(self, direction: str, site: str) -> Float[Tensor, "layer pair"]:
        """Patched minus the target's clean log-odds."""
        target = direction.split("->")[1]
        return self._slot(direction, site) - self.clean(target)

    def fraction(self, direction: str, site: str) -> Float[Tensor, "layer pair"]:
        """Per pair, the share of the clean gap the patch moves the target towards the source
        (module docstring); NaN for pairs whose clean gap is below ``min_gap``."""
        source, target = direction.split("->")
        span = self.clean(source) - self.clean(target)
        frac = self.change(direction, site) / span
        return torch.where(self.gap >= self.min_gap, frac, torch.full_like(frac, float("nan")))

    def largest_gaps(self, n: int) -> list[int]:
        """Indices of the ``n`` pairs with the largest clean gap (the pairs whose harmful side the
        model most clearly treats differently: the informative ones for a generation check)."""
        return [int(i) for i in torch.argsort(self.gap, descending=True, stable=True)[:n]]

    @property
    def n_used(self) -> int:
        """Pairs whose clean gap reaches ``min_gap`` (those the per-pair fraction averages)."""
        return int((self.gap >= self.min_gap).sum())

    def profile(self, site: str = "resid_post", direction: str = "harmful->benign") -> np.ndarray:
        """Mean per-pair fraction, per layer (``layers`` order; NaN when no pair is used)."""
        if not self.n_used:
            return np.full(len(self.layers), np.nan)
        return np.nanmean(self.fraction(direction, site).numpy(), axis=1)

    def to_frame(self) -> pd.DataFrame:
        """One row per (direction, site, layer): the raw mean change (all pairs), the mean
        per-pair fraction with its standard error (pairs with gap >= ``min_gap``), and the
        ratio of means (mean change / mean source-minus-target gap, all pairs)."""
        rows = []
        for direction in self.directions:
            source, target = direction.split("->")
            span = float((self.clean(source) - self.clean(target)).mean())
            for site in self.sites:
                change, frac = self.change(direction, site).numpy(), self.fraction(direction, site).numpy()
                for k, layer in enumerate(self.layers):
                    used = frac[k][~np.isnan(frac[k])]
                    rows.append({
                        "direction": direction, "site": site, "layer": layer,
                        "mean_change": float(change[k].mean()),
                        "sd_change": float(change[k].std(ddof=1)) if len(change[k]) > 1 else float("nan"),
                        "fraction": float(used.mean()) if len(used) else float("nan"),
                        "fraction_sem": float(used.std(ddof=1) / np.sqrt(len(used))) if len(used) > 1 else float("nan"),
                        "fraction_of_means": float(change[k].mean()) / span if span else float("nan"),
                        "n_pairs": len(change[k]), "n_used": len(used),
                    })
        return pd.DataFrame(rows)

    def band(self, site: str = "resid_post", direction: str = "harmful->benign", threshold: float = 0.5) -> list[int]:
        """Layers whose mean per-pair fraction reaches ``threshold``."""
        profile = self.profile(site, direction)
        return [layer for layer, value in zip(self.layers, profile) if value >= threshold]

    def top_layers(self, site: str, direction: str = "harmful->benign", share: float = 0.5,
                   floor: float = 0.05) -> list[int]:
        """Layers whose fraction reaches ``share`` of the site's largest one (none when even the
        largest is below ``floor``: no single layer of the site matters)."""
        profile = self.profile(site, direction)
        if np.all(np.isnan(profile)) or np.nanmax(profile) < floor:
            return []
        best = np.nanmax(profile)
        return [layer for layer, value in zip(self.layers, profile) if value >= share * best]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "pair_ids": self.pair_ids, "sites": self.sites, "layers": self.layers,
            "directions": self.directions, "min_gap": self.min_gap, "n_used": self.n_used,
            "metric": "refusal log-odds of the first answer token",
            "harmful_clean": self.harmful_clean.tolist(), "benign_clean": self.benign_clean.tolist(),
            "patched": {d: {s: self._slot(d, s).tolist() for s in self.sites} for d in self.directions},
            "layers_table": self.to_frame().to_dict(orient="records"), "settings": self.settings,
        }


def _sides(pairs) -> dict[str, list[str]]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs")
    return {"harmful": [p.harmful for p in pairs], "benign": [p.benign for p in pairs]}


def patching_sweep(
    model: LoadedModel,
    pairs,
    *,
    sites=DEFAULT_SITES,
    layers=None,
    directions=DIRECTIONS,
    batch_size: int = 16,
    max_rows: int = 512,
    min_gap: float = 0.5,
    template: str | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Patch every (site, layer) at the last prompt position, batched (module docstring), in
    each direction; returns the refusal log-odds clean and patched.  Three passes over the
    prompts at most: the first source run clean, then each target run with its patches (whose
    clean activations are the other direction's sources)."""
    sites, directions = check_sites(sites), check_directions(directions)
    layers = check_layers(layers, model.n_layers)
    text = _sides(pairs)
    metric = refusal_metric(model)
    keys = [(site, layer) for site in sites for layer in layers]
    kwargs = dict(batch_size=batch_size, max_rows=max_rows, template=template, progress=progress)
    clean: dict[str, Tensor] = {}
    acts: dict[str, dict] = {}
    patched = torch.empty(len(directions), len(sites), len(layers), len(text["harmful"]))
    for d, direction in enumerate(directions):
        source, target = direction.split("->")
        if source not in acts:
            run = run_last_position(model, text[source], metric, capture=keys, **kwargs)
            clean[source], acts[source] = run.clean, run.acts
        run = run_last_position(model, text[target], metric, capture=keys, jobs=keys, sources=acts[source], **kwargs)
        clean.setdefault(target, run.clean)
        acts.setdefault(target, run.acts)
        patched[d] = run.patched.reshape(len(sites), len(layers), -1)
    return PatchingResult(
        model=str(getattr(model, "spec", "model")), pair_ids=[p.pair_id for p in pairs], sites=sites,
        layers=layers, directions=directions, harmful_clean=clean["harmful"], benign_clean=clean["benign"],
        patched=patched, min_gap=min_gap,
        settings={"batch_size": batch_size, "template": template or getattr(model, "template", None)},
    )


# --- refusal by generation ---------------------------------------------------------------------


@dataclass
class PatchedGeneration:
    """Refusal of greedy answers with the last prompt position patched during the prefill.

    ``screened``: every pair's clean verdicts (harmful, benign); ``kept``: the indices of the
    pairs the patches ran on (with ``contrast_only``, those whose harmful request is refused and
    whose benign request is answered, clean: the pairs where a patch can flip the verdict)."""

    model: str
    site: str
    layers: list[int]
    directions: list[str]
    pair_ids: list[str]  # every screened pair
    screened: dict[str, list[bool]]  # side -> refused, per screened pair
    kept: list[int]
    patched: dict[str, dict[int, list[bool]]]  # direction -> layer -> refused, per kept pair
    answers: dict[str, dict[int, list[str]]]
    max_new_tokens: int
    contrast_only: bool

    def rate(self, direction: str, layer: int) -> Rate:
        flags = self.patched[direction][layer]
        return Rate(sum(flags), len(flags))

    def to_frame(self) -> pd.DataFrame:
        """One row per clean side (over all screened pairs, and over the kept ones) and one per
        (direction, layer) (over the kept pairs)."""
        rows = []
        for side, flags in self.screened.items():
            kept = [flags[i] for i in self.kept]
            rows.append({"direction": f"clean {side}", "layer": None, "pairs": "screened",
                         **Rate(sum(flags), len(flags)).to_dict()})
            rows.append({"direction": f"clean {side}", "layer": None, "pairs": "kept",
                         **Rate(sum(kept), len(kept)).to_dict()})
        for direction in self.directions:
            for layer in self.layers:
                rows.append({"direction": direction, "layer": layer, "pairs": "kept",
                             **self.rate(direction, layer).to_dict()})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"model": self.model, "site": self.site, "layers": self.layers, "directions": self.directions,
                "contrast_only": self.contrast_only, "screened_pair_ids": self.pair_ids,
                "kept_pair_ids": [self.pair_ids[i] for i in self.kept], "max_new_tokens": self.max_new_tokens,
                "rates": self.to_frame().to_dict(orient="records")}


def patched_refusal_rates(
    model: LoadedModel,
    pairs,
    layers,
    *,
    site: str = "resid_post",
    directions=("harmful->benign",),
    contrast_only: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    judge=None,
    template: str | None = None,
) -> PatchedGeneration:
    """Generate and judge both sides of every pair clean; keep the pairs to patch (with
    ``contrast_only`` those whose harmful side is refused and benign side answered; at most
    ``limit``); then, for each layer and direction, generate the targets' answers with the
    source's last-prompt-position activation at ``site`` written in during the prefill only
    (``PrefillPatch``) and judge them."""
    from interp.answers import generate_and_judge
    from interp.judge import DEFAULT_JUDGE

    judge = judge or DEFAULT_JUDGE
    directions = check_directions(directions)
    layers = check_layers(layers, model.n_layers)
    check_sites([site])
    pairs = list(pairs)
    text = _sides(pairs)
    gen = dict(judge=judge, max_new_tokens=max_new_tokens, template=template)
    screened = {side: [a.refused for a in generate_and_judge(model, text[side], batch_size=batch_size, **gen)]
                for side in ("harmful", "benign")}
    kept = [i for i in range(len(pairs))
            if not contrast_only or (screened["harmful"][i] and not screened["benign"][i])][:limit]
    patched: dict[str, dict[int, list[bool]]] = {d: {} for d in directions}
    answers: dict[str, dict[int, list[str]]] = {d: {} for d in directions}
    if kept:
        subset = {side: [queries[i] for i in kept] for side, queries in text.items()}
        keys = [(site, layer) for layer in layers]
        sources = {side: run_last_position(model, subset[side], refusal_metric(model), capture=keys,
                                           batch_size=batch_size, template=template).acts
                   for side in {d.split("->")[0] for d in directions}}
        for direction in directions:
            source, target = direction.split("->")
            prompts = PromptBatches.build(model, subset[target], template=template, batch_size=batch_size,
                                          share_prefix=False)
            for layer in layers:
                hook = PrefillPatch(prompts, sources[source][(site, layer)])
                judged = generate_and_judge(model, subset[target], prompts=prompts,
                                            fwd_hooks=[(hook_name(site, layer), hook)], **gen)
                patched[direction][layer] = [a.refused for a in judged]
                answers[direction][layer] = [a.text for a in judged]
    else:
        for direction in directions:
            for layer in layers:
                patched[direction][layer], answers[direction][layer] = [], []
    return PatchedGeneration(str(getattr(model, "spec", "model")), site, layers, directions,
                             [p.pair_id for p in pairs], screened, kept, patched, answers, max_new_tokens,
                             contrast_only)


__all__ = [
    "DEFAULT_SITES", "DIRECTIONS", "SITES", "LastPositionRun", "PatchedGeneration", "PatchingResult", "PrefillPatch",
    "last_position_hook", "patched_refusal_rates", "patching_sweep", "prompt_last_logits", "prompt_log_odds",
    "refusal_log_odds", "refusal_metric", "run_last_position",
]
