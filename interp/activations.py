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
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.data import prompts_hash
from interp.errors import SafetyLayersError
from interp.forward import PromptBatches, capture_hooks, last_token_index, prefix_cache
from interp.hooks import hook_name
from interp.io import atomic_path
from interp.models import LoadedModel
from interp.ranges import check_layers

SITE = "resid_post"
HOOK = "blocks.{layer}.hook_resid_post"
"""How a saved file names the captured site (``hook_name(SITE, layer)`` for every layer)."""
TENSOR_KEY = "resid_post_last_token"
FORMAT_VERSION = "1"


class ActivationFileError(SafetyLayersError, ValueError):
    """A saved activation file that is unreadable, or was made for another model or prompt list."""


def capture_last_token_resid(
    model: LoadedModel,
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
    model's) and tokenised once.  ``layers`` picks a subset (default all; returned in ascending
    order); the forward pass stops after the deepest requested layer.  With ``share_prefix`` the
    token prefix common to all prompts is run once and its keys and values reused.
    """
    queries = list(queries)
    if not queries:
        raise ValueError("no queries to capture")
    layers = check_layers(layers, model.n_layers)
    prompts = PromptBatches.build(
        model, queries, template=template, batch_size=batch_size, share_prefix=share_prefix, padding_side=padding_side
    )
    kv = prefix_cache(model, prompts.prefix_ids)
    out: Tensor | None = None
    bar = tqdm(total=len(queries), desc="capture resid_post", unit="prompt", disable=not progress)
    for batch in prompts.batches:
        last = last_token_index(batch.mask) - prompts.n_prefix
        rows = torch.arange(len(batch.index), device=last.device)
        reads = {hook_name(SITE, i): (lambda resid, rows=rows, last=last: resid[rows, last]) for i in layers}
        found = capture_hooks(model, batch.ids, batch.mask, reads, kv)
        acts = torch.stack([found[hook_name(SITE, i)] for i in layers], dim=1).float().cpu()
        if out is None:
            out = torch.empty(len(queries), len(layers), acts.shape[-1])
        out[torch.tensor(batch.index)] = acts
        bar.update(len(batch.index))
    bar.close()
    return out


@torch.no_grad()
def apply_final_norm(model: LoadedModel, acts: Float[Tensor, "prompt layer d_model"]) -> Float[Tensor, "prompt layer d_model"]:
    """Return a copy of ``acts`` whose last layer has the model's final norm applied, i.e. the
    vectors Hugging Face's ``hidden_states`` (and the paper) use.  ``acts`` must hold all layers."""
    if acts.shape[1] != model.n_layers:
        raise ValueError(f"expected all {model.n_layers} layers, got {acts.shape[1]}")
    norm = model.decoder().norm
    param = next(norm.parameters())
    out = acts.clone()
    out[:, -1] = norm(acts[:, -1].to(param.device, param.dtype)).float().cpu()
    return out


# --- save / load ------------------------------------------------------------------------------


def activation_metadata(model: LoadedModel, queries: list[str], template: str | None = None, layers=None) -> dict[str, str]:
    """What a saved activation file must match: model, template, prompt list, layers."""
    layers = check_layers(layers, model.n_layers)
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
    model: LoadedModel,
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
