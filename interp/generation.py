"""The one generation path: batched greedy decoding that every experiment uses (refusal
judging, R_o, self-distilled training answers, task quality).

``generate_completions(model, queries, ...)`` formats and tokenises the queries once
(``interp.forward.PromptBatches``: shared prefix, length-sorted batches, left padding), runs the
shared prefix once and broadcasts its keys and values, then decodes each batch greedily with a
KV cache (``decode_greedy``): at every step the next token is the argmax of the logits at the
last position, whatever the model's own generation config asks for (no sampling, no repetition
penalty).  A row stops at its first end token (EOS or an end-of-turn marker; not included), at
``max_new_tokens``, or, with ``decided``, as soon as ``decided(text_so_far)`` is true: the
refusal judge's "this verdict can no longer change" (``interp.judge``), so a refusal is cut after
its first few tokens.  Finished rows leave the batch (their cache rows are dropped), so the
remaining rows' steps cost less.

Hooks: ``fwd_hooks`` (TransformerLens ``(name, fn)`` pairs on ``model.bridge``) are active for
the whole call, prefix included; hooks added outside (``with scaled(...)``) work as well, since the
bridge wraps the modules ``hf_model`` runs.  The result equals ``hf_model.generate`` greedy
decoding row for row (tested), in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.forward import (
    PromptBatches,
    broadcast_cache,
    decoder_of,
    last_logits,
    position_ids,
    prefix_cache,
    run_decoder,
)

Decided = Callable[[str], bool]


@dataclass(frozen=True)
class Completion:
    """One greedy answer: its text (no prompt, no special tokens, stripped), its token ids, and
    why it stopped: ``"end"`` (an end token), ``"decided"`` (the verdict was fixed) or
    ``"length"`` (``max_new_tokens``)."""

    text: str
    token_ids: tuple[int, ...]
    stop: str


def _check(queries, max_new_tokens: int, batch_size: int) -> list[str]:
    queries = list(queries)
    if not all(isinstance(q, str) for q in queries):
        raise TypeError("queries must be a list of strings")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    return queries


@torch.no_grad()
def decode_greedy(
    model,
    logits: Tensor,
    cache,
    mask: Tensor,
    *,
    max_new_tokens: int,
    decided: Decided | None = None,
    lm: torch.nn.Module | None = None,
) -> list[tuple[list[int], str]]:
    """Continue a prefilled batch greedily.  ``logits``: ``[batch, vocab]`` next-token logits
    after the prompt; ``cache``: its KV cache; ``mask``: its attention mask (prefix included).
    ``lm``: the causal-LM module tree the steps run on (default ``model.hf_model``, bridge hooks
    and all; ``RoEvaluator`` passes the scaled ``plain_twin``).  Returns ``(token_ids, stop)`` per
    row."""
    tok, end_ids = model.tokenizer, set(model.end_token_ids)
    decoder = decoder_of(model, lm)
    n = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    stops: list[str | None] = [None] * n
    active = torch.arange(n, device=mask.device)
    next_ids = logits.argmax(-1)
    for step in range(max_new_tokens):
        keep = []
        for row, token in zip(active.tolist(), next_ids.tolist()):
            if token in end_ids:
                stops[row] = "end"
                continue
            out[row].append(token)
            if decided is not None and decided(tok.decode(out[row], skip_special_tokens=True)):
                stops[row] = "decided"
            elif step + 1 == max_new_tokens:
                stops[row] = "length"
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            position = {row: k for k, row in enumerate(active.tolist())}
            select = torch.tensor([position[row] for row in keep], device=mask.device)
            cache.batch_select_indices(select)
            mask, next_ids = mask[select], next_ids[select]
            active = torch.tensor(keep, device=mask.device)
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        hidden = decoder(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=position_ids(mask)[:, -1:],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        next_ids = last_logits(model, hidden, lm).argmax(-1)
    return [(ids, stop or "length") for ids, stop in zip(out, stops)]


@torch.no_grad()
def prefill(model, batch, kv) -> tuple[Tensor, object]:
    """Run one ``PromptBatches`` batch after the shared prefix; return its next-token logits and
    KV cache."""
    out = run_decoder(model, batch.ids, batch.mask, kv, use_cache=True)
    return last_logits(model, out.last_hidden_state), out.past_key_values


def generate_completions(
    model,
    queries: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    template: str | None = None,
    decided: Decided | None = None,
    share_prefix: bool = True,
    fwd_hooks=(),
    prompts: PromptBatches | None = None,
    on_first_logits: Callable[[list[int], Tensor], None] | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[Completion]:
    """Greedy completions of ``queries`` (module docstring), one ``Completion`` per query in
    order.  ``prompts``: a ``PromptBatches`` built earlier for the same queries (tokenised once
    for many calls).  ``on_first_logits(index, logits)``: called per batch with the first step's
    logits (caller's row indices), e.g. to record the first-step refusal estimate for free."""
    queries = _check(queries, max_new_tokens, batch_size)
    if not queries:
        return []
    prompts = prompts or PromptBatches.build(
        model, queries, template=template, batch_size=batch_size, share_prefix=share_prefix
    )
    if prompts.n_prompts != len(queries):
        raise ValueError(f"prompts were built for {prompts.n_prompts} queries, got {len(queries)}")
    was_training = model.hf_model.training
    model.hf_model.eval()
    results: list[Completion | None] = [None] * len(queries)
    hooks = model.bridge.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else nullcontext()
    try:
        with hooks:
            kv = prefix_cache(model, prompts.prefix_ids)
            bar = tqdm(prompts.batches, desc=desc, unit="batch", disable=not progress)
            for batch in bar:
                logits, cache = prefill(model, batch, kv)
                if on_first_logits is not None:
                    on_first_logits(batch.index, logits)
                rows = decode_greedy(model, logits, cache, batch.mask, max_new_tokens=max_new_tokens, decided=decided)
                for i, (ids, stop) in zip(batch.index, rows):
                    text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    results[i] = Completion(text, tuple(ids), stop)
    finally:
        model.hf_model.train(was_training)
    return results


def generate(model, queries: list[str], **kwargs) -> list[str]:
    """The texts of ``generate_completions`` (same arguments)."""
    return [c.text for c in generate_completions(model, queries, **kwargs)]


__all__ = ["Completion", "decode_greedy", "generate", "generate_completions", "prefill", "broadcast_cache"]
