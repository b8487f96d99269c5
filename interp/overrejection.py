"""R_o, the over-rejection count, and a fast estimate of it from the first decoding step.

**R_o** (Li et al. §3.4.2): how many queries of the over-rejection set D_o (benign "How to
⟨violent verb⟩ ⟨object⟩?" questions) the model refuses.  As in the paper's code the answers are
greedy and short (``max_new_tokens=16``); refusal is judged by ``interp.refusal.is_refusal`` on
the decoded answer (the paper leaves its rule unstated).  ``count_over_rejection`` measures the
model as it is, so run it inside ``interp.scaling.scaled(...)`` for a scaled model, or call
``over_rejection_at``, which does both.

**The first-step estimate.**  A refusal shows in its first token: refusals open with a small set
of tokens ("I" of "I'm sorry", "Sorry", "As" of "As an AI").  ``refusal_opening_token_ids``
collects the first token of every refusal phrase that can open an answer, as this model's
tokenizer splits it.  ``FirstStepEstimator`` computes for each prompt the probability mass the
next-token distribution at the last prompt position puts on those tokens (``mass``), and whether
the greedy first token is one of them (``argmax_opens``).  The summed mass is a smooth estimate
of R_o and the count of argmax flags a hard one.  Both over-count ("I" also opens "I'd be happy
to ..."), so their agreement with generated R_o is *measured* (``compare_estimate``: Pearson r
across configurations, per-prompt agreement), not assumed: use them to rank configurations in a
coarse search, then confirm the best ones by generation (``interp.locate``).  Measured on the
aligned SmolLM2 (first 64 queries, 10 scaled configurations): Pearson r 0.72 (mass) and 0.75
(count) with generated R_o, per-prompt agreement 79%; within one sweep around [7,19] only
r = 0.37, because this model's "I'm not sure." opens with the same "I" as its refusals.

**What is computed once and reused.**

1. *The shared prompt prefix.*  Every prompt of a set starts with the same tokens (the chat
   template's system turn, or the Alpaca preamble): 26 of the ~35 tokens of a SmolLM2 chat prompt.
   Their keys and values are computed once per configuration (one sequence) and broadcast over
   each batch, so a batch's prefill runs only the few tokens that differ.  This serves both the
   generated R_o (``greedy_texts``: ``hf_model.generate`` continues from the prefix cache) and
   the estimate.
2. *Layers below the lowest scaled layer* (estimate only).  They compute the same thing in every
   configuration, so ``FirstStepEstimator`` runs each batch through them once and keeps the
   residual stream entering layer ``start`` (``blocks.{start}.hook_resid_pre``, all positions);
   a configuration then runs only layers ``start..L-1``, the final norm and the unembedding of
   the last position.  TransformerBridge's own ``forward(start_at_layer=k)`` is not used: it
   still executes blocks ``0..k-1`` and discards their output (see its docstring), which saves
   nothing.  ``resume_from_layer`` instead runs the HF decoder with its layer list temporarily
   cut to ``layers[start:]`` and a hook on ``blocks.{start}.hook_resid_pre`` that swaps in the
   cached residual, so the model's own forward still builds the mask and rotary embeddings.
   Generation does not reuse lower layers: after the first token every configuration feeds its
   own tokens back, so only the few suffix tokens of the prompt could be shared.
3. *Batching.*  Prompts are tokenised once, sorted by length and left-padded in large batches.

Position ids are counted over real tokens (``cumsum(mask) - 1``), as ``generate`` counts them,
so padding between the shared prefix and a short suffix changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.activations import common_prefix_length, pad_rows
from interp.data import evenly_spaced, load_prompts
from interp.refusal import REFUSAL_PHRASES, end_token_ids, generate, greedy_kwargs, is_refusal
from interp.scaling import ALL_COMPONENTS, check_layers, scaled

DATASET = "over_rejection"
DEFAULT_MAX_NEW_TOKENS = 16
"""The paper's code generates 16 new tokens (``scaling.py`` L77); the paper says 4-8 suffice."""
DEFAULT_BATCH_SIZE = 64


def over_rejection_prompts(
    limit: int | None = None, part: str = "all", dataset: str = DATASET, spread: bool = False
) -> list[str]:
    """The over-rejection set D_o (731 queries shipped), optionally only ``limit`` of them: the
    first ``limit``, or with ``spread=True`` ``limit`` rows evenly spaced over the whole set
    (D_o is grouped by verb, so its first rows are all "kill ..." queries)."""
    queries = load_prompts(dataset, part)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        queries = evenly_spaced(queries, limit) if spread else queries[:limit]
    return queries


# --- tokens, prefix, padding ------------------------------------------------------------------


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted over real tokens only, as ``generate`` counts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_rows(model, queries: list[str], template: str | None = None) -> list[Int[Tensor, "pos"]]:
    """Each query formatted and tokenised (``LoadedModel.encode``), unpadded, on the CPU."""
    queries = list(queries)
    if not queries:
        raise ValueError("no queries")
    enc = model.encode(queries, padding_side="right", template=template)
    lengths = enc["attention_mask"].sum(1).tolist()
    return [enc["input_ids"][b, :n].cpu() for b, n in enumerate(lengths)]


def _decoder(hf_model) -> torch.nn.Module:
    return hf_model.get_decoder()


@torch.no_grad()
def prefix_cache(model, prefix_ids: Int[Tensor, "pos"]) -> list[tuple[Tensor, Tensor]] | None:
    """Every layer's keys and values for the shared prefix (one sequence), under whatever hooks
    are active; ``None`` for an empty prefix."""
    if len(prefix_ids) == 0:
        return None
    out = _decoder(model.hf_model)(input_ids=prefix_ids[None].to(model.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def broadcast_cache(model, kv: list[tuple[Tensor, Tensor]] | None, batch: int):
    """A fresh ``DynamicCache`` holding the prefix for each of ``batch`` rows (views, no copies;
    the model's updates concatenate into new tensors, so ``kv`` is never modified)."""
    if kv is None:
        return None
    from transformers import DynamicCache

    shared = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(shared, config=model.hf_model.config)


@dataclass
class PromptBatches:
    """Prompts tokenised once: the shared prefix, and length-sorted, left-padded suffix batches."""

    prefix_ids: Int[Tensor, "prefix"]
    batches: list[tuple[list[int], Int[Tensor, "batch suffix"], Int[Tensor, "batch prefix_plus_suffix"]]]
    n_prompts: int

    @classmethod
    def build(cls, model, queries, *, template=None, batch_size=DEFAULT_BATCH_SIZE, share_prefix=True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = prompt_rows(model, queries, template)
        n_prefix = common_prefix_length(rows) if share_prefix else 0
        tok = model.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        batches = []
        for b in range(0, len(order), batch_size):
            index = order[b:b + batch_size]
            ids, mask = pad_rows([rows[i][n_prefix:] for i in index], "left", pad_id)
            full_mask = torch.cat([torch.ones(len(index), n_prefix, dtype=mask.dtype), mask], dim=1)
            batches.append((index, ids.to(model.device), full_mask.to(model.device)))
        return cls(rows[0][:n_prefix], batches, len(rows))


# --- R_o from generated text ------------------------------------------------------------------


@torch.no_grad()
def greedy_texts(
    model,
    queries: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    template: str | None = None,
    prompts: PromptBatches | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers (``max_new_tokens`` tokens or up to an end token), in the caller's order,
    generated from a shared-prefix cache (module docstring, point 1) under the active hooks.
    ``prompts`` reuses a tokenisation made by ``PromptBatches.build`` for the same queries."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prompts = prompts or PromptBatches.build(model, queries, template=template, batch_size=batch_size)
    if prompts.n_prompts != len(queries):
        raise ValueError(f"prompts were built for {prompts.n_prompts} queries, got {len(queries)}")
    tok = model.tokenizer
    end_ids = end_token_ids(model)
    kv = prefix_cache(model, prompts.prefix_ids)
    prefix = prompts.prefix_ids.to(model.device)
    texts: list[str | None] = [None] * prompts.n_prompts
    for index, ids, full_mask in tqdm(prompts.batches, desc="R_o", unit="batch", disable=not progress):
        full_ids = torch.cat([prefix.expand(len(index), -1), ids], dim=1)
        out = model.hf_model.generate(
            input_ids=full_ids,
            attention_mask=full_mask,
            past_key_values=broadcast_cache(model, kv, len(index)),
            max_new_tokens=max_new_tokens,
            **greedy_kwargs(model, end_ids),
        )
        for row, i in enumerate(index):
            generated = out[row, full_ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(generated) if t in end_ids), len(generated))
            texts[i] = tok.decode(generated[:cut], skip_special_tokens=True).strip()
    return texts


def refusal_flags(
    model,
    queries: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    template: str | None = None,
    share_prefix: bool = True,
    prompts: PromptBatches | None = None,
    progress: bool = False,
    **matcher,
) -> list[bool]:
    """Whether the model (as it is now: run inside ``scaled`` for a scaled one) refuses each query.

    ``share_prefix=True``: ``greedy_texts`` (full ``max_new_tokens`` answers from the prefix
    cache); ``False``: ``interp.refusal.generate`` (stops each row once its verdict is fixed).
    ``matcher``: ``phrases``/``window``/``exceptions`` for ``is_refusal``."""
    if share_prefix:
        texts = greedy_texts(
            model, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
            prompts=prompts, progress=progress,
        )
    else:
        texts = generate(
            model, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_when_decided=True,
            template=template, progress=progress, desc="R_o", **matcher,
        )
    return [is_refusal(t, **matcher) for t in texts]


def count_over_rejection(model, queries: list[str], **kwargs) -> int:
    """R_o: how many ``queries`` the model refuses (greedy, 16 new tokens by default; keyword
    arguments as ``refusal_flags``)."""
    return int(sum(refusal_flags(model, queries, **kwargs)))


def over_rejection_at(
    model, queries: list[str], layers=None, alpha: float = 1.0, components=ALL_COMPONENTS, **kwargs
) -> int:
    """R_o with ``layers`` scaled by ``alpha`` (``layers=None``: the unscaled model)."""
    with _scaling(model, layers, alpha, components):
        return count_over_rejection(model, queries, **kwargs)


def _scaling(model, layers, alpha, components):
    return nullcontext() if layers is None else scaled(model, layers, alpha, components)


# --- the first-step estimate ------------------------------------------------------------------


def refusal_opening_token_ids(tokenizer, phrases=REFUSAL_PHRASES) -> list[int]:
    """The first token of each phrase that can open an answer (starts with a capital letter),
    as ``tokenizer`` splits it at the start of a response (no leading space)."""
    ids = set()
    for phrase in phrases:
        phrase = phrase.strip()
        if not phrase or not phrase[0].isupper():
            continue  # "cannot help with" only ever appears mid-sentence
        tokens = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if tokens:
            ids.add(int(tokens[0]))
    if not ids:
        raise ValueError("no refusal phrase can open an answer (none starts with a capital letter)")
    return sorted(ids)


class _Stop(Exception):
    """Raised by the capture hook once the residual entering ``start`` is in hand."""


@contextmanager
def _layers_from(decoder: torch.nn.Module, start: int) -> Iterator[None]:
    """Temporarily make the decoder's layer list ``layers[start:]`` (restored on exit)."""
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(original)[start:])
    try:
        yield
    finally:
        decoder.layers = original


def _check_start(model, start: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < model.n_layers:
        raise IndexError(f"start layer {start!r} outside this model's layers 0..{model.n_layers - 1}")


def _decoder_kwargs(model, ids, full_mask, kv):
    n_prefix = full_mask.shape[1] - ids.shape[1]
    return dict(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=position_ids_from_mask(full_mask)[:, n_prefix:],
        past_key_values=broadcast_cache(model, kv, ids.shape[0]),
        use_cache=kv is not None,
    )


@torch.no_grad()
def capture_resid_pre(model, ids, full_mask, start: int, kv=None) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering layer ``start`` at every (suffix) position of a batch,
    stopping the forward there.  ``kv``: the prefix cache when ``full_mask`` covers a prefix."""
    _check_start(model, start)
    found: list[Tensor] = []

    def grab(resid, hook):
        found.append(resid.detach().clone())
        raise _Stop

    try:
        with model.bridge.hooks(fwd_hooks=[(f"blocks.{start}.hook_resid_pre", grab)]):
            _decoder(model.hf_model)(**_decoder_kwargs(model, ids, full_mask, kv))
    except _Stop:
        pass
    if not found:
        raise RuntimeError(f"blocks.{start}.hook_resid_pre never fired")
    return found[0]


@torch.no_grad()
def resume_from_layer(model, resid_pre, ids, full_mask, start: int, kv=None) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at the last position, running only layers ``start..L-1`` on a cached
    residual (module docstring, point 2).  Hooks on the bridge (e.g. ``scaled``) fire as usual."""
    _check_start(model, start)

    def inject(resid, hook):
        if resid.shape != resid_pre.shape:
            raise RuntimeError(f"cached residual {tuple(resid_pre.shape)} does not fit {tuple(resid.shape)}")
        return resid_pre.to(resid.dtype)

    decoder = _decoder(model.hf_model)
    with _layers_from(decoder, start), model.bridge.hooks(fwd_hooks=[(f"blocks.{start}.hook_resid_pre", inject)]):
        hidden = decoder(**_decoder_kwargs(model, ids, full_mask, kv)).last_hidden_state
    return model.hf_model.lm_head(hidden[:, -1])


@torch.no_grad()
def last_position_logits(model, ids, full_mask, kv=None) -> Float[Tensor, "batch vocab"]:
    """Full-forward next-token logits at the last position (left padding), for reference."""
    hidden = _decoder(model.hf_model)(**_decoder_kwargs(model, ids, full_mask, kv)).last_hidden_state
    return model.hf_model.lm_head(hidden[:, -1])


@dataclass
class FirstStep:
    """First-step refusal statistics of one configuration, per prompt (caller's order)."""

    mass: Float[Tensor, "prompt"]  # probability on refusal-opening tokens, in [0, 1]
    argmax_opens: Bool[Tensor, "prompt"]  # the greedy first token opens a refusal

    @property
    def expected(self) -> float:
        """Smooth R_o estimate: the summed opener mass."""
        return float(self.mass.sum())

    @property
    def count(self) -> int:
        """Hard R_o estimate: prompts whose greedy first token opens a refusal."""
        return int(self.argmax_opens.sum())


class FirstStepEstimator:
    """First-step refusal estimate for many configurations of one prompt list.

    Built once: the prompts are tokenised and batched, the shared prefix's cache is computed, and
    the residual entering layer ``start`` is kept for every batch.  ``start`` must not exceed the
    lowest layer any later configuration scales.  ``estimate(layers, alpha)`` then recomputes the
    prefix cache under the configuration (one sequence) and runs layers ``start..L-1`` only.
    """

    def __init__(
        self,
        model,
        queries: list[str],
        start: int = 0,
        *,
        template: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        share_prefix: bool = True,
        phrases=REFUSAL_PHRASES,
        progress: bool = False,
    ):
        _check_start(model, start)
        self.model, self.queries, self.start = model, list(queries), start
        self.opener_ids = torch.tensor(refusal_opening_token_ids(model.tokenizer, phrases), device=model.device)
        self.prompts = PromptBatches.build(
            model, self.queries, template=template, batch_size=batch_size, share_prefix=share_prefix
        )
        kv = prefix_cache(model, self.prompts.prefix_ids)
        bar = tqdm(self.prompts.batches, desc=f"cache resid_pre {start}", disable=not progress)
        self.resid = [capture_resid_pre(model, ids, mask, start, kv) for _, ids, mask in bar]

    def check_config(self, layers) -> list[int] | None:
        if layers is None:
            return None
        layers = check_layers(layers, self.model.n_layers)
        if layers[0] < self.start:
            raise ValueError(
                f"layer {layers[0]} is scaled but the cached residual enters layer {self.start}; "
                f"build the estimator with start <= {layers[0]}"
            )
        return layers

    @torch.no_grad()
    def logits(self, layers=None, alpha: float = 1.0, components=ALL_COMPONENTS) -> Float[Tensor, "prompt vocab"]:
        """Last-position logits of every prompt (caller's order) under the configuration."""
        layers = self.check_config(layers)
        out: Tensor | None = None
        with _scaling(self.model, layers, alpha, components):
            kv = prefix_cache(self.model, self.prompts.prefix_ids)
            for (index, ids, mask), resid in zip(self.prompts.batches, self.resid):
                logits = resume_from_layer(self.model, resid, ids, mask, self.start, kv)
                if out is None:
                    out = logits.new_empty(len(self.queries), logits.shape[-1])
                out[torch.tensor(index, device=out.device)] = logits
        return out

    def estimate(self, layers=None, alpha: float = 1.0, components=ALL_COMPONENTS) -> FirstStep:
        logits = self.logits(layers, alpha, components).float()
        mass = logits.softmax(-1)[:, self.opener_ids].sum(-1).clamp(0.0, 1.0)
        argmax_opens = torch.isin(logits.argmax(-1), self.opener_ids)
        return FirstStep(mass.cpu(), argmax_opens.cpu())


# --- agreement of the estimate with generation -------------------------------------------------


def compare_estimate(
    model,
    queries: list[str],
    configs: list[tuple[object, float]],
    *,
    components=ALL_COMPONENTS,
    estimator: FirstStepEstimator | None = None,
    progress: bool = True,
    **flag_kwargs,
) -> tuple[pd.DataFrame, dict]:
    """Generated R_o and the first-step estimates for each ``(layers, alpha)`` configuration
    (``layers=None``: unscaled).  Returns one row per configuration and a summary: Pearson r of
    each estimate with the generated count across configurations, and how often the argmax flag
    agrees with the generated verdict per prompt (pooled over configurations)."""
    if not configs:
        raise ValueError("no configurations to compare")
    if estimator is None:
        starts = [check_layers(layers, model.n_layers)[0] for layers, _ in configs if layers is not None]
        estimator = FirstStepEstimator(model, queries, min(starts, default=0))
    rows, agree, total = [], 0, 0
    for layers, alpha in tqdm(configs, desc="compare estimate", disable=not progress):
        with _scaling(model, layers, alpha, components):
            flags = torch.tensor(refusal_flags(model, queries, **flag_kwargs), dtype=torch.bool)
        first = estimator.estimate(layers, alpha, components)
        same = flags == first.argmax_opens
        agree, total = agree + int(same.sum()), total + len(flags)
        rows.append({
            "layers": "none" if layers is None else str(layers),
            "alpha": alpha,
            "R_o": int(flags.sum()),
            "estimate_count": first.count,
            "estimate_mass": round(first.expected, 3),
            "prompt_agreement": round(float(same.float().mean()), 4),
        })
    frame = pd.DataFrame(rows)
    summary = {
        "n_configs": len(frame),
        "n_prompts": len(queries),
        "pearson_count": pearson(frame["R_o"], frame["estimate_count"]),
        "pearson_mass": pearson(frame["R_o"], frame["estimate_mass"]),
        "prompt_agreement": agree / total,
    }
    return frame, summary


def pearson(a, b) -> float | None:
    """Pearson correlation, ``None`` when undefined (fewer than 2 values or no spread)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
