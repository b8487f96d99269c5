"""Which MLP neurons and attention heads matter most for refusing: the element masks of the
"freeze safety-critical units" comparison (the paper's NFFT point, after Wei et al. 2024).

The score of a unit is attribution patching's first-order estimate of its effect on refusal:
``|activation x gradient|`` of the refusal log-odds at the first answer token, summed over
harmful prompts (the *train* pairs, never an evaluation set).  The refusal log-odds is
``log p - log(1 - p)`` with ``p`` the summed probability of the refusal-opening tokens
(``interp.estimate``).  A neuron's activation is the input of the down projection
(``blocks.{i}.mlp.out.hook_in``); a head's is its slice of the input of the output projection
(``blocks.{i}.attn.o.hook_in``), both at the last prompt position.

``critical_masks(model, prompts, budget)`` takes units best score first until their parameters
reach ``budget`` (e.g. what freezing the located layers freezes) and returns element masks by HF
parameter name (``finetune.masks.neuron_mask``/``head_mask``) for ``finetune.train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.masks import head_mask, merge_element_masks, neuron_mask
from interp.estimate import refusal_log_odds, refusal_opening_token_ids
from interp.forward import PromptBatches, decoder_kwargs
from interp.hooks import hook_name
from interp.judge import DEFAULT_JUDGE


@dataclass
class UnitScores:
    """Per layer: neuron scores ``[layer, d_ff]`` and head scores ``[layer, n_heads]``."""

    neurons: torch.Tensor
    heads: torch.Tensor


def unit_scores(model, prompts: list[str], batch_size: int = 16) -> UnitScores:
    """``|activation x gradient|`` of the refusal log-odds per MLP neuron and attention head."""
    config = model.config
    n_heads, head_dim = config.num_attention_heads, model.arch.head_dim(config)
    opener_ids = torch.tensor(refusal_opening_token_ids(model.tokenizer, DEFAULT_JUDGE.openers), device=model.device)
    neurons = torch.zeros(model.n_layers, config.intermediate_size)
    heads = torch.zeros(model.n_layers, n_heads)
    saved: dict[str, torch.Tensor] = {}

    def keep(value, hook):
        value.retain_grad()
        saved[hook.name] = value
        return value

    names = [hook_name("out", i, "in") for i in range(model.n_layers)]
    names += [hook_name("o", i, "in") for i in range(model.n_layers)]
    flags = {p: p.requires_grad for p in model.hf_model.parameters()}
    model.hf_model.requires_grad_(True)
    try:
        for batch in PromptBatches.build(model, prompts, batch_size=batch_size, share_prefix=False).batches:
            saved.clear()
            with torch.enable_grad(), model.bridge.hooks(fwd_hooks=[(n, keep) for n in names]):
                # the decoder with autograd on (interp.forward.run_decoder is no_grad: inference only)
                hidden = model.decoder()(**decoder_kwargs(model, batch.ids, batch.mask)).last_hidden_state
                log_odds = refusal_log_odds(model.hf_model.lm_head(hidden[:, -1]), opener_ids)
                log_odds.sum().backward()
            for i in range(model.n_layers):
                act = saved[hook_name("out", i, "in")]
                neurons[i] += (act * act.grad)[:, -1].abs().sum(0).detach().float().cpu()
                act = saved[hook_name("o", i, "in")]
                per_head = (act * act.grad)[:, -1].reshape(len(batch.index), n_heads, head_dim).sum(-1)
                heads[i] += per_head.abs().sum(0).detach().float().cpu()
            model.hf_model.zero_grad(set_to_none=True)
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return UnitScores(neurons, heads)


def critical_masks(model, prompts: list[str], budget: int, scores: UnitScores | None = None) -> tuple[dict, dict]:
    """Element masks freezing the best-scored units until ``budget`` parameters are frozen; and
    a record of what was chosen."""
    scores = scores or unit_scores(model, prompts)
    config = model.config
    d, dim = config.hidden_size, model.arch.head_dim(config)
    neuron_cost, head_cost = 3 * d, 2 * dim * d  # gate+up rows and a down column; q rows and o columns
    units = [(float(s), "neuron", i, j) for i in range(model.n_layers) for j, s in enumerate(scores.neurons[i])]
    units += [(float(s), "head", i, h) for i in range(model.n_layers) for h, s in enumerate(scores.heads[i])]
    units.sort(key=lambda u: -u[0])
    chosen: dict[tuple[str, int], list[int]] = {}
    frozen = 0
    for _, kind, layer, index in units:
        cost = neuron_cost if kind == "neuron" else head_cost
        if frozen + cost > budget:
            continue
        chosen.setdefault((kind, layer), []).append(index)
        frozen += cost
    masks = merge_element_masks(*[
        (neuron_mask if kind == "neuron" else head_mask)(model, layer, indices) for (kind, layer), indices in chosen.items()
    ])
    record = {
        "budget": budget, "frozen_elements": int(sum(int(m.sum()) for m in masks.values())),
        "neurons": sum(len(v) for (k, _), v in chosen.items() if k == "neuron"),
        "heads": sum(len(v) for (k, _), v in chosen.items() if k == "head"),
        "layers": sorted({layer for _, layer in chosen}),
    }
    return masks, record
