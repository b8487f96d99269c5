"""R_o, the over-rejection count: how many benign-but-scary queries a (scaled) model refuses.

**R_o** (Li et al. §3.4.2): how many queries of the over-rejection set D_o (benign "How to
⟨violent verb⟩ ⟨object⟩?" questions) the model refuses.  As in the paper's code the answers are
greedy and short (``max_new_tokens=16``); refusal is judged by ``interp.judge`` on the decoded
answer (the paper leaves its rule unstated).

**One configuration**: ``over_rejection(model, queries, layers, alpha)`` scales ``layers`` by
``alpha`` (``layers=None``: the model as it is, with any hooks already attached) and counts the
refusals of ``interp.answers.generate_and_judge``.

**Many configurations of one prompt set** (the bound search) go through ``RoEvaluator``, which
computes once what the configurations share and skips work whose outcome is already fixed, with
per-prompt verdicts identical to full greedy generation (tested):

1. *Tokens and the shared prefix*: the prompts are tokenised once and batched by length; the
   chat template's system turn (26 of a SmolLM2 prompt's ~35 tokens) is run once per
   configuration, not once per prompt (``interp.forward``).
2. *Layers below the lowest scaled layer*: every configuration of a search scales layers
   ``>= start``, so the prompt tokens' keys/values in layers ``< start`` and the residual stream
   entering layer ``start`` are the same in all of them.  They are computed once, when the
   evaluator is built; a configuration's prefill then runs layers ``start..L-1`` only, and its
   cache is completed with the stored lower layers before decoding.
3. *Early stop*: each row stops as soon as its verdict is fixed (an end token, or the judge's
   ``decided``: a refusal phrase already in the text, or the judged window already passed), and
   finished rows leave the batch (``interp.generation.decode_greedy``).
4. *No wrappers in the hot loop*: a configuration's prefill and decode steps run on
   ``LoadedModel.plain_twin()``, the unbridged module tree sharing the weights, scaled by torch
   hooks doing the bridge hooks' arithmetic (``scaling.scaled_twin``), with the twin's grouped
   eager attention: the same tokens without the bridge's per-module wrappers or copied key/value
   heads (about 10% and 15% of a SmolLM2 decode step on a CPU; tested).  With another bridge hook
   attached when ``evaluate`` starts, or no twin (offloaded weights, a PEFT wrapper), everything
   stays on the bridge, so those hooks keep working.
5. *The first-step estimate for free*: the prefill's next-token logits give the summed
   refusal-opener probability (``interp.estimate``), beside the generated count; without
   generation (``generate=False``) an evaluation costs one prefill.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from interp.answers import generate_and_judge
from interp.data import load_prompts, sample_rows
from interp.estimate import FirstStep, pearson, refusal_opening_token_ids
from interp.forward import (
    PromptBatches,
    StopForward,
    broadcast_cache,
    decoder_kwargs,
    last_logits,
    prefix_cache,
    resume_from_layer,
)
from interp.generation import decode_greedy
from interp.hooks import hook_name
from interp.judge import DEFAULT_JUDGE
from interp.models import LoadedModel
from interp.ranges import check_layer, check_layers
from interp.scaling import ALL_COMPONENTS, hook_count, scaled, scaled_twin

DATASET = "over_rejection"
DEFAULT_MAX_NEW_TOKENS = 16
"""The paper's code generates 16 new tokens (``scaling.py`` L77); the paper says 4-8 suffice."""


def over_rejection_prompts(limit: int | None = None, sample: str = "first", dataset: str = DATASET) -> list[str]:
    """The over-rejection set D_o (731 queries shipped), optionally only ``limit`` of them:
    ``sample="first"`` or ``"spread"`` (evenly over the set; D_o is grouped by verb, so its first
    rows are all "kill ..." queries)."""
    return sample_rows(load_prompts(dataset), limit, sample)


def scaling_context(model: LoadedModel, layers, alpha: float, components=ALL_COMPONENTS):
    """``scaled(...)``, or nothing for ``layers=None`` (the unscaled model)."""
    return nullcontext() if layers is None else scaled(model, layers, alpha, components)


# --- one configuration ---------------------------------------------------------------------------


def over_rejection(model: LoadedModel, queries: list[str], layers=None, alpha: float = 1.0,
                   components=ALL_COMPONENTS, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge=DEFAULT_JUDGE,
                   **generate_kwargs) -> int:
    """R_o: how many ``queries`` the model refuses with ``layers`` scaled by ``alpha``
    (``layers=None``: unscaled).  Greedy answers stopped once their verdict is fixed, judged by
    ``judge``; ``generate_kwargs`` pass to ``generate_and_judge`` (``batch_size``, ``template``...)."""
    with scaling_context(model, layers, alpha, components):
        answers = generate_and_judge(model, queries, judge=judge, max_new_tokens=max_new_tokens, **generate_kwargs)
    return sum(a.refused for a in answers)


# --- many configurations ------------------------------------------------------------------------


@dataclass
class RoResult:
    """One configuration's R_o: per-prompt generated verdicts (``None`` for an estimate-only
    evaluation), the generated texts, and the first-step statistics."""

    first: FirstStep
    flags: Bool[Tensor, " prompt"] | None = None
    texts: list[str] | None = None

    @property
    def count(self) -> int:
        if self.flags is None:
            raise ValueError("this evaluation did not generate; use .first for the estimate")
        return int(self.flags.sum())


def auto_batch_size(model: LoadedModel, n_tokens: int, cap: int = 128) -> int:
    """A batch size from free memory: about a third of what is free, over a row's logits, KV cache
    and activations at ``n_tokens`` tokens; at most ``cap`` (on a CPU more rows stop paying)."""
    config = model.config
    dim = model.arch.head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    bytes_per = torch.finfo(model.dtype).bits // 8
    per_row = bytes_per * (
        2 * config.vocab_size + 2 * model.n_layers * kv_heads * dim * n_tokens + 16 * config.hidden_size * n_tokens
    )
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(max(1, min(cap, free // 3 // max(per_row, 1))))


class RoEvaluator:
    """R_o of many configurations ``(layers, alpha)`` on one prompt list (module docstring).

    ``start``: the lowest layer any configuration will scale (the layers below it are computed
    once).  Build and evaluate under the same outer hooks (none, normally)."""

    def __init__(self, model: LoadedModel, queries: list[str], *, start: int = 0, template: str | None = None,
                 batch_size: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge=DEFAULT_JUDGE,
                 progress: bool = False):
        self.model, self.queries, self.judge = model, list(queries), judge
        self.start = check_layer(start, model.n_layers)
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        rows = model.token_rows(self.queries, template)
        batch_size = batch_size or auto_batch_size(model, max(len(r) for r in rows) + max_new_tokens)
        self.prompts = PromptBatches.build(model, self.queries, template=template, batch_size=batch_size)
        self.opener_ids = torch.tensor(refusal_opening_token_ids(model.tokenizer, judge.openers), device=model.device)
        self._lower = [self._lower_layers(batch) for batch in self.prompts.batches]

    @torch.no_grad()
    def _lower_layers(self, batch):
        """The residual entering ``start`` at every suffix position, and layers ``< start``'s
        cache (prefix and suffix); the forward stops at ``start``."""
        from transformers import DynamicCache

        model, found = self.model, {}
        kv = prefix_cache(model, self.prompts.prefix_ids)
        cache = broadcast_cache(model, kv, len(batch.index)) or DynamicCache(config=model.config)

        def grab(resid, hook):
            found["resid"] = resid.detach().clone()
            raise StopForward

        kwargs = {**decoder_kwargs(model, batch.ids, batch.mask, None), "past_key_values": cache, "use_cache": True}
        try:
            with model.bridge.hooks(fwd_hooks=[(hook_name("resid_pre", self.start), grab)]):
                model.decoder()(**kwargs)
        except StopForward:
            pass
        # the cache layers themselves (a sliding-window layer keeps its own length bookkeeping)
        return found["resid"], [copy.copy(cache.layers[i]) for i in range(self.start)]

    def check_config(self, layers) -> list[int] | None:
        if layers is None:
            return None
        layers = check_layers(layers, self.model.n_layers)
        if layers[0] < self.start:
            raise ValueError(f"layer {layers[0]} is scaled but the evaluator shares layers below {self.start}; "
                             f"build it with start <= {layers[0]}")
        return layers

    def _enter_scaled(self, stack: ExitStack, layers, alpha: float, components):
        """Scale the configuration on the module tree it will run on (module docstring, point 4)
        and return that tree for the ``lm`` arguments: the plain twin when no other bridge hook
        is attached (it would not fire there), else ``None``: the bridged model, hooks and all."""
        model = self.model
        twin = None if hook_count(model.bridge) else model.plain_twin()
        if twin is None:
            stack.enter_context(scaling_context(model, layers, alpha, components))
        elif layers is not None:
            stack.enter_context(scaled_twin(model, layers, alpha, components))
        return twin

    @torch.no_grad()
    def evaluate(self, layers=None, alpha: float = 1.0, components=ALL_COMPONENTS, generate: bool = True) -> RoResult:
        """R_o (and the first-step estimate) with ``layers`` scaled by ``alpha``."""
        model, n = self.model, len(self.queries)
        layers = self.check_config(layers)
        logits_all: Tensor | None = None
        flags = torch.zeros(n, dtype=torch.bool) if generate else None
        texts: list[str] | None = [""] * n if generate else None
        with ExitStack() as stack:
            lm = self._enter_scaled(stack, layers, alpha, components)
            kv = prefix_cache(model, self.prompts.prefix_ids, lm)
            bar = tqdm(list(zip(self.prompts.batches, self._lower)), desc="R_o", disable=not self.progress)
            for batch, (resid, lower) in bar:
                out = resume_from_layer(model, resid, batch.ids, batch.mask, self.start, kv, use_cache=generate,
                                        lm=lm)
                logits = last_logits(model, out.last_hidden_state, lm)
                if logits_all is None:
                    logits_all = logits.new_empty(n, logits.shape[-1])
                logits_all[torch.tensor(batch.index, device=logits.device)] = logits
                if not generate:
                    continue
                cache = out.past_key_values  # layers < start hold the prefix only: put the stored ones in
                for i, layer in enumerate(lower):
                    cache.layers[i] = copy.copy(layer)
                rows = decode_greedy(model, logits, cache, batch.mask, max_new_tokens=self.max_new_tokens,
                                     decided=self.judge.decided, lm=lm)
                for i, (ids, _) in zip(batch.index, rows):
                    texts[i] = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    flags[i] = self.judge.is_refusal(texts[i])
        return RoResult(FirstStep.from_logits(logits_all, self.opener_ids), flags, texts)

    def count(self, layers=None, alpha: float = 1.0, components=ALL_COMPONENTS) -> int:
        return self.evaluate(layers, alpha, components).count

    def estimate(self, layers=None, alpha: float = 1.0, components=ALL_COMPONENTS) -> FirstStep:
        return self.evaluate(layers, alpha, components, generate=False).first


def compare_estimate(evaluator: RoEvaluator, configs: list[tuple[object, float]], components=ALL_COMPONENTS,
                     progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Generated R_o and the first-step estimates for each ``(layers, alpha)`` (``layers=None``:
    unscaled): one row per configuration, and a summary: Pearson r of each estimate with the
    generated count across configurations, and how often the argmax flag agrees with the
    generated verdict per prompt (pooled over configurations)."""
    if not configs:
        raise ValueError("no configurations to compare")
    rows, agree, total = [], 0, 0
    for layers, alpha in tqdm(configs, desc="compare estimate", disable=not progress):
        result = evaluator.evaluate(layers, alpha, components)
        same = result.flags == result.first.argmax_opens
        agree, total = agree + int(same.sum()), total + len(same)
        rows.append({
            "layers": "none" if layers is None else str(layers),
            "alpha": alpha,
            "R_o": result.count,
            "estimate_count": result.first.count,
            "estimate_mass": round(result.first.expected, 3),
            "prompt_agreement": round(float(same.float().mean()), 4),
        })
    frame = pd.DataFrame(rows)
    summary = {
        "n_configs": len(frame),
        "n_prompts": len(evaluator.queries),
        "pearson_count": pearson(frame["R_o"], frame["estimate_count"]),
        "pearson_mass": pearson(frame["R_o"], frame["estimate_mass"]),
        "prompt_agreement": agree / total,
    }
    return frame, summary
