"""Forward-pass plumbing shared by capture, generation, R_o and patching.

- **Tokens.**  ``PromptBatches`` tokenises a prompt list once (``LoadedModel.token_rows``),
  finds the token prefix every prompt shares (a chat template's system turn, the Alpaca
  preamble: about 26 of a SmolLM2 chat prompt's ~35 tokens), and cuts the rest into
  length-sorted, padded batches, remembering each row's place in the caller's order.  (Not on a
  sliding-window model with left padding, e.g. Mistral or Gemma-2: the padding would sit between
  prefix and suffix and take window slots.)
- **The shared prefix.**  ``prefix_cache`` runs that prefix once (one sequence, under whatever
  hooks are active) and ``broadcast_cache`` hands its keys and values to every row of a batch as
  views, so a batch's prefill runs only the tokens that differ.
- **Positions.**  Position ids are counted over real tokens only (``cumsum(mask) - 1``), as
  ``generate`` counts them, so padding never shifts a prompt, on either side.
- **Partial forwards.**  ``run_decoder`` calls the decoder stack (no LM head) with a prefix cache;
  ``capture_hooks`` records hook values and stops the forward once the deepest needed hook has
  fired (``StopForward``); ``resume_from_layer`` runs only layers ``start..L-1`` on a residual
  stream captured at ``blocks.{start}.hook_resid_pre`` (the decoder's layer list is cut for the
  call, so the model's own forward still builds the masks and rotary embeddings; TransformerLens's
  ``forward(start_at_layer=k)`` would still execute blocks ``0..k-1``).
- **Which module tree.**  ``prefix_cache``, ``layers_from``, ``resume_from_layer`` and
  ``last_logits`` take ``lm``: the causal LM to run, by default ``model.hf_model`` (bridged, its
  hooks firing); ``RoEvaluator`` passes ``model.plain_twin()``, the unbridged tree sharing the
  weights, where a torch pre-hook stands in for the bridge's ``hook_resid_pre``.
- **Grouped attention.**  ``grouped_eager_attention`` is transformers' eager attention (soft-capping
  included) without ``repeat_kv``: under grouped-query attention the query heads that share a
  key/value head are stacked and multiplied with it once, instead of copying every key and value
  head ``n_rep`` times (a seventh of a SmolLM2 decode step on a CPU).  The plain twin runs with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.hooks import hook_name


class StopForward(Exception):
    """Raised by a hook once everything needed has been recorded, to skip the rest."""


def last_token_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Position of each row's last real token, whichever side was padded."""
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a prompt in the batch has no tokens at all")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def position_ids(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted over real tokens only, so padding never shifts a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_rows(rows: list[Tensor], padding_side: str, pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack token rows of different lengths into ``(input_ids, attention_mask)``, padded on one side."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, cols] = row
        mask[b, cols] = 1
    return ids, mask


def common_prefix_length(rows: list[Tensor]) -> int:
    """Length of the token prefix all rows share, leaving every row at least its last token."""
    shortest = min(len(r) for r in rows)
    first = rows[0]
    length = shortest - 1
    for row in rows[1:]:
        differs = (row[:length] != first[:length]).nonzero()
        if len(differs):
            length = int(differs[0])
    return max(length, 0)


@dataclass
class Batch:
    """One padded batch of prompt suffixes: ``index`` maps its rows to the caller's order;
    ``mask`` covers the shared prefix as well (``[batch, prefix + suffix]``)."""

    index: list[int]
    ids: Int[Tensor, "batch suffix"]
    mask: Int[Tensor, "batch prefix_plus_suffix"]


@dataclass
class PromptBatches:
    """Prompts tokenised once: the shared prefix and length-sorted suffix batches."""

    prefix_ids: Int[Tensor, " prefix"]
    batches: list[Batch]
    n_prompts: int
    lengths: list[int]

    @classmethod
    def build(cls, model, queries, *, template=None, batch_size: int = 64, share_prefix: bool = True,
              padding_side: str = "left") -> "PromptBatches":
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        queries = list(queries)
        if not queries:
            raise ValueError("no queries")
        rows = model.token_rows(queries, template)
        if padding_side == "left" and getattr(model.config, "sliding_window", None):
            share_prefix = False  # padding between prefix and suffix would take sliding-window slots
        n_prefix = common_prefix_length(rows) if share_prefix else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        batches = []
        for b in range(0, len(order), batch_size):
            index = order[b:b + batch_size]
            ids, mask = pad_rows([rows[i][n_prefix:] for i in index], padding_side, model.pad_token_id)
            full_mask = torch.cat([torch.ones(len(index), n_prefix, dtype=mask.dtype), mask], dim=1)
            batches.append(Batch(index, ids.to(model.device), full_mask.to(model.device)))
        return cls(rows[0][:n_prefix], batches, len(rows), [len(r) for r in rows])

    @property
    def n_prefix(self) -> int:
        return len(self.prefix_ids)


def decoder_of(model, lm: torch.nn.Module | None = None) -> torch.nn.Module:
    """The decoder stack (no LM head) of ``lm``, or of ``model.hf_model`` by default."""
    return model.decoder() if lm is None else lm.get_decoder()


GROUPED_EAGER = "safety_layers_grouped_eager"


def grouped_eager_attention(module, query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv k d"],
                            value: Float[Tensor, "batch kv k d"], attention_mask: Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, softcap: float | None = None, **kwargs):
    """``eager_attention_forward`` of the supported families (Gemma-2's soft-capping included),
    computing each key/value head's scores for its whole group of query heads in one matmul.  The
    same arithmetic per element; on a CPU the scores of a one-token query may differ from eager's
    in the last bit (a matrix kernel instead of a vector one), verdicts do not (tested)."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * q_len, dim), key.transpose(2, 3))
    weights = scores.view(batch, heads, q_len, k_len) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(batch, kv_heads, group * q_len, k_len), value)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), weights


def register_grouped_eager() -> str:
    """Register ``grouped_eager_attention`` (and eager's mask) with transformers under
    ``GROUPED_EAGER``; returns the name for ``config._attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_EAGER, eager_mask)
    return GROUPED_EAGER


@torch.no_grad()
def prefix_cache(model, prefix_ids: Int[Tensor, " pos"], lm=None) -> list[tuple[Tensor, Tensor]] | None:
    """Every layer's keys and values for the shared prefix (one sequence), under whatever hooks
    are active; ``None`` for an empty prefix."""
    if len(prefix_ids) == 0:
        return None
    out = decoder_of(model, lm)(input_ids=prefix_ids[None].to(model.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def broadcast_cache(model, kv: list[tuple[Tensor, Tensor]] | None, batch: int):
    """A fresh ``DynamicCache`` holding the prefix for each of ``batch`` rows (views, no copies;
    the model's updates concatenate into new tensors, so ``kv`` is never modified)."""
    if kv is None:
        return None
    from transformers import DynamicCache

    shared = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(shared, config=model.config)


def decoder_kwargs(model, ids: Tensor, full_mask: Tensor, kv=None) -> dict:
    """Arguments for the decoder on ``ids`` (the tokens after a prefix of
    ``full_mask.shape[1] - ids.shape[1]`` positions whose cache is ``kv``)."""
    n_prefix = full_mask.shape[1] - ids.shape[1]
    return dict(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=position_ids(full_mask)[:, n_prefix:],
        past_key_values=broadcast_cache(model, kv, ids.shape[0]),
        use_cache=kv is not None,
    )


@torch.no_grad()
def run_decoder(model, ids: Tensor, full_mask: Tensor, kv=None, use_cache: bool | None = None):
    """The decoder stack (no LM head) on one batch after a prefix; returns the HF output."""
    kwargs = decoder_kwargs(model, ids, full_mask, kv)
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    return model.decoder()(**kwargs)


@torch.no_grad()
def capture_hooks(
    model,
    ids: Tensor,
    full_mask: Tensor,
    reads: dict[str, Callable[[Tensor], Tensor]],
    kv=None,
    stop: bool = True,
) -> dict[str, Tensor]:
    """Run one batch and return ``{hook_name: read(value)}`` for each bridge hook in ``reads``
    (``read`` picks what to keep, e.g. the last position).  With ``stop`` the forward is cut as
    soon as every hook has fired."""
    found: dict[str, Tensor] = {}

    def make(name, read):
        def hook(value, hook):
            found[name] = read(value).detach()
            if stop and len(found) == len(reads):
                raise StopForward
            return value

        return hook

    try:
        with model.bridge.hooks(fwd_hooks=[(name, make(name, read)) for name, read in reads.items()]):
            run_decoder(model, ids, full_mask, kv)
    except StopForward:
        pass
    missing = [name for name in reads if name not in found]
    if missing:
        raise RuntimeError(f"hooks {missing} never fired; is this a decoder-only model?")
    return found


class _Skip(torch.nn.Module):
    """A decoder layer that does nothing (stands in for a layer ``layers_from`` skips)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def layers_from(model, start: int, lm=None) -> Iterator[None]:
    """Temporarily replace the decoder's layers below ``start`` with pass-throughs (restored on
    exit).  The list keeps its length, so a model that picks each layer's attention mask by its
    index (Gemma-2, Qwen2: ``config.layer_types[i]``) still gives layer ``i`` its own mask."""
    decoder = decoder_of(model, lm)
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList([_Skip() for _ in range(start)] + list(original)[start:])
    try:
        yield
    finally:
        decoder.layers = original


@contextmanager
def _injected(model, start: int, replace: Callable[[Tensor], Tensor], lm=None) -> Iterator[None]:
    """``replace`` the residual entering layer ``start``: the bridge's ``hook_resid_pre``, or a
    torch pre-hook on the layer of a plain ``lm`` (its first argument, or ``hidden_states``)."""
    if lm is None:
        with model.bridge.hooks(fwd_hooks=[(hook_name("resid_pre", start), lambda resid, hook: replace(resid))]):
            yield
        return

    def pre_hook(module, args, kwargs):
        if args:
            return (replace(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

    handle = decoder_of(model, lm).layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def resume_from_layer(model, resid_pre: Tensor, ids: Tensor, full_mask: Tensor, start: int, kv=None,
                      use_cache: bool = False, lm=None):
    """Run layers ``start..L-1`` on ``resid_pre`` (the residual entering layer ``start`` at every
    position of ``ids``) and return the decoder output (``last_hidden_state`` has the final norm
    applied).  Hooks on the bridge fire as usual (with ``lm`` a plain twin: its torch hooks)."""

    def inject(resid):
        if resid.shape != resid_pre.shape:
            raise RuntimeError(f"cached residual {tuple(resid_pre.shape)} does not fit {tuple(resid.shape)}")
        return resid_pre.to(resid.dtype)

    kwargs = decoder_kwargs(model, ids, full_mask, kv)
    kwargs["use_cache"] = use_cache or kv is not None
    with layers_from(model, start, lm), _injected(model, start, inject, lm):
        return decoder_of(model, lm)(**kwargs)


@torch.no_grad()
def last_logits(model, hidden: Float[Tensor, "batch pos d_model"], lm=None) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at the last position of a decoder output's hidden states."""
    return (model.hf_model if lm is None else lm).lm_head(hidden[:, -1])
