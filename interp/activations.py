"""Capture the residual stream at the last prompt token after every layer.

``capture_last_token_resid(model, queries)`` formats the queries with the model's template,
runs them through the model in padded batches and keeps, for each prompt and layer, the value
of ``blocks.{layer}.hook_resid_post`` at the prompt's last *real* token:

    Float[Tensor, "prompt layer d_model"]

Speed.  The work is the tokens' passage through the layers, so the capture avoids tokens:
the token prefix every prompt shares (a chat template's system turn, the Alpaca preamble: about
half the tokens of a short query) is run once and its keys and values broadcast over each batch;
prompts are sorted by length before batching so that little goes to padding (and put back in the
caller's order at the end); the unembedding is never computed (the decoder stack is called
without the LM head).  Only the last position is kept (the hooks gather it as the forward runs),
so memory does not grow with prompt length.

Padding.  Either side works.  The last real token of row ``b`` is the last position whose
attention-mask entry is 1, and position ids are counted over real tokens only
(``cumsum(mask) - 1``), so a left-padded prompt gets the same rotary positions as it would alone.
The batched capture equals one-prompt-at-a-time capture to float rounding (tested).

Relation to the paper's vector.  Li et al. take ``generate(..., output_hidden_states=True)``
and the last-position entry of every decoder layer's hidden state, skipping the embedding
output.  For layers ``0 .. L-2`` that is exactly ``hook_resid_post``.  For the last layer,
Hugging Face's final ``hidden_states`` entry has the model's final norm (``ln_final``) applied;
``blocks.{L-1}.hook_resid_post`` does not.  We keep the un-normed residual for every layer, so
the last layer's vectors (and their cosines) differ from the paper's by that norm:
``apply_final_norm(model, acts)`` converts them when a comparison needs the paper's exact vector.

A large run is done once: ``save_activations``/``load_activations`` keep the tensor in a
safetensors file whose metadata records the model fingerprint, the template and a hash of the
prompt list; loading refuses a file made for another model, template or prompt list, and
``cached_capture`` loads such a file when it matches and otherwise captures and saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.data import prompts_hash
from interp.io import atomic_path

HOOK = "blocks.{layer}.hook_resid_post"
TENSOR_KEY = "resid_post_last_token"
FORMAT_VERSION = "1"


class ActivationFileError(ValueError):
    """A saved activation file that is unreadable, or was made for another model or prompt list."""


class _StopForward(Exception):
    """Raised by the last needed hook to skip the layers nobody asked for."""


def last_token_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
    """Position of each row's last real token, whichever side was padded."""
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a prompt in the batch has no tokens at all")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted over real tokens only, so padding never shifts a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (the bridge's hooks fire inside it)."""
    getter = getattr(hf_model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    return decoder if decoder is not None else hf_model


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("no layers requested")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise IndexError(f"layer(s) {bad} outside this model's layers 0..{n_layers - 1}")
    return layers


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


def pad_rows(rows: list[Tensor], padding_side: str, pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack token rows of different lengths into ``(input_ids, attention_mask)``, padded on one side."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, cols] = row
        mask[b, cols] = 1
    return ids, mask


@torch.no_grad()
def prefix_key_values(model, prefix_ids: Int[Tensor, "pos"]) -> list[tuple[Tensor, Tensor]]:
    """Every layer's keys and values for a token prefix that many prompts share (batch of one)."""
    out = _decoder(model.hf_model)(input_ids=prefix_ids[None].to(model.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@torch.no_grad()
def capture_batch(
    model,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layers: list[int],
    prefix: list[tuple[Tensor, Tensor]] | None = None,
) -> Float[Tensor, "batch layer d_model"]:
    """``hook_resid_post`` at the last real token of each row of one padded batch.

    With ``prefix`` (from ``prefix_key_values``), the rows are the tokens that follow that shared
    prefix; its keys and values are broadcast over the batch instead of being recomputed.
    """
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    rows = torch.arange(batch, device=device)
    last = last_token_index(attention_mask)
    kwargs = {"use_cache": False}
    full_mask = attention_mask
    if prefix:
        from transformers import DynamicCache

        prefix_len = prefix[0][0].shape[-2]
        ones = torch.ones(batch, prefix_len, dtype=attention_mask.dtype, device=device)
        full_mask = torch.cat([ones, attention_mask], dim=1)
        shared = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
        kwargs = {"use_cache": True, "past_key_values": DynamicCache(shared, config=model.hf_model.config)}
    position_ids = position_ids_from_mask(full_mask)[:, full_mask.shape[1] - input_ids.shape[1]:]
    found: dict[int, Tensor] = {}
    stop_after = max(layers)

    def grab(layer):
        def hook(resid, hook):  # resid: [batch, pos, d_model]
            found[layer] = resid[rows, last].detach()
            if layer == stop_after and len(found) == len(layers):
                raise _StopForward
            return resid

        return hook

    fwd_hooks = [(HOOK.format(layer=i), grab(i)) for i in layers]
    try:
        with model.bridge.hooks(fwd_hooks=fwd_hooks):
            _decoder(model.hf_model)(
                input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids, **kwargs
            )
    except _StopForward:
        pass
    missing = [i for i in layers if i not in found]
    if missing:
        raise RuntimeError(f"hooks for layers {missing} never fired; is this a decoder-only model?")
    return torch.stack([found[i] for i in layers], dim=1)


def capture_last_token_resid(
    model,
    queries: list[str],
    *,
    batch_size: int = 16,
    padding_side: str = "left",
    template: str | None = None,
    layers: list[int] | None = None,
    share_prefix: bool = True,
    progress: bool = True,
) -> Float[Tensor, "prompt layer d_model"]:
    """The residual stream after each layer (``hook_resid_post``) at each query's last prompt
    token, as float32 on the CPU, in the order of ``queries``.

    ``model`` is a ``LoadedModel``; queries are formatted with ``template`` (default: the
    model's) and tokenised once by ``model.encode``.  ``layers`` picks a subset (default all);
    the forward pass stops after the deepest requested layer.  With ``share_prefix`` the token
    prefix common to all prompts (a chat template's system turn, the Alpaca preamble) is run once
    and its keys and values reused, which roughly halves the work for short queries.
    """
    queries = list(queries)
    if not queries:
        raise ValueError("no queries to capture")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    layers = _check_layers(layers, model.n_layers)
    encoded = model.encode(queries, padding_side="right", template=template)
    lengths = encoded["attention_mask"].sum(1).tolist()
    rows = [encoded["input_ids"][b, :n].cpu() for b, n in enumerate(lengths)]
    prefix_len = common_prefix_length(rows) if share_prefix else 0
    prefix = prefix_key_values(model, rows[0][:prefix_len]) if prefix_len else None
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(queries)), key=lambda i: lengths[i])
    out: Tensor | None = None
    bar = tqdm(total=len(queries), desc="capture resid_post", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i][prefix_len:] for i in chunk], padding_side, pad_id)
        acts = capture_batch(model, ids, mask, layers, prefix).float().cpu()
        if out is None:
            out = torch.empty(len(queries), len(layers), acts.shape[-1])
        out[torch.tensor(chunk)] = acts
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def apply_final_norm(model, acts: Float[Tensor, "prompt layer d_model"]) -> Float[Tensor, "prompt layer d_model"]:
    """Return a copy of ``acts`` whose last layer has the model's final norm applied, i.e. the
    vectors Hugging Face's ``hidden_states`` (and the paper) use.  ``acts`` must hold all layers."""
    if acts.shape[1] != model.n_layers:
        raise ValueError(f"expected all {model.n_layers} layers, got {acts.shape[1]}")
    norm = _decoder(model.hf_model).norm
    param = next(norm.parameters())
    out = acts.clone()
    out[:, -1] = norm(acts[:, -1].to(param.device, param.dtype)).float().cpu()
    return out


# --- save / load ------------------------------------------------------------------------------


def activation_metadata(model, queries: list[str], template: str | None = None, layers=None) -> dict[str, str]:
    """What a saved activation file must match: model, template, prompt list, layers."""
    layers = _check_layers(layers, model.n_layers)
    return {
        "format": FORMAT_VERSION,
        "hook": HOOK,
        "position": "last real prompt token",
        "model_spec": str(model.spec),
        "model_fingerprint": model.fingerprint(),
        "template": template or model.template,
        "prompts_hash": prompts_hash(list(queries)),
        "n_prompts": str(len(queries)),
        "layers": json.dumps(layers),
    }


# fields that must agree for a file to be reused (the spec may differ: a path can move)
_MUST_MATCH = ("format", "hook", "model_fingerprint", "template", "prompts_hash", "n_prompts", "layers")


def save_activations(path: str | Path, acts: Float[Tensor, "prompt layer d_model"], metadata: dict[str, str]) -> Path:
    """Write ``acts`` and its metadata (see ``activation_metadata``) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    if acts.ndim != 3:
        raise ValueError(f"activations must be [prompt, layer, d_model], got shape {tuple(acts.shape)}")
    if int(metadata["n_prompts"]) != acts.shape[0] or len(json.loads(metadata["layers"])) != acts.shape[1]:
        raise ValueError(
            f"metadata says {metadata['n_prompts']} prompts x {len(json.loads(metadata['layers']))} layers "
            f"but the tensor is {tuple(acts.shape)}"
        )
    with atomic_path(path) as tmp:
        save_file({TENSOR_KEY: acts.contiguous().cpu()}, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def read_activation_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ActivationFileError(f"no activation file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types on a bad header
        raise ActivationFileError(f"{path} is not a readable safetensors file: {err}") from err


def load_activations(path: str | Path, expected: dict[str, str] | None = None) -> Float[Tensor, "prompt layer d_model"]:
    """Load a saved activation tensor, refusing it unless its metadata matches ``expected``
    (from ``activation_metadata``) in model fingerprint, template, prompt hash and layers."""
    from safetensors.torch import load_file

    meta = read_activation_metadata(path)
    if expected is not None:
        wrong = [
            f"{key}: file has {meta.get(key)!r}, expected {expected[key]!r}"
            for key in _MUST_MATCH
            if key in expected and meta.get(key) != str(expected[key])
        ]
        if wrong:
            raise ActivationFileError(
                f"{path} was made for another model, template or prompt list ({'; '.join(wrong)}); "
                "delete it or choose another path to capture afresh"
            )
    tensors = load_file(str(path))
    if TENSOR_KEY not in tensors:
        raise ActivationFileError(f"{path} holds no {TENSOR_KEY!r} tensor")
    return tensors[TENSOR_KEY]


def cached_capture(
    model,
    queries: list[str],
    path: str | Path | None = None,
    *,
    template: str | None = None,
    layers: list[int] | None = None,
    **capture_kwargs,
) -> Float[Tensor, "prompt layer d_model"]:
    """``capture_last_token_resid``, reusing ``path`` when it holds the same model/template/prompts
    (a mismatched file is an ``ActivationFileError``, never silently overwritten)."""
    if path is None:
        return capture_last_token_resid(model, queries, template=template, layers=layers, **capture_kwargs)
    expected = activation_metadata(model, queries, template, layers)
    if Path(path).is_file():
        return load_activations(path, expected)
    acts = capture_last_token_resid(model, queries, template=template, layers=layers, **capture_kwargs)
    save_activations(path, acts, expected)
    return acts
