"""Scale the weights of chosen layers by α, through hooks instead of copied weights.

Li et al. (§3.4) locate the safety layers by multiplying every projection weight of a layer
range by a factor α and counting how the model's over-rejection changes.  Their code copies the
model and multiplies ``q/k/v/o_proj`` and ``gate/up/down_proj`` weights in place (norms and
embeddings untouched).  Here the copy is unnecessary: a TransformerLens hook on each projection's
output turns the projection ``y = W x + b`` into the output of ``(α W) x + b``::

    y_scaled = α · (y − b) + b            (= α · y when the projection has no bias)

That is exactly the weight-scaled model, bias and all (the paper scales weights only, so a bias
must *not* be multiplied: ``α · y`` would be wrong for models with biases).  The bias is read
from the wrapped HF ``nn.Linear`` when the context opens (a view of the parameter, so in-place
weight updates stay visible).  The hooks are ``blocks.{i}.attn.{q,k,v,o}.hook_out`` and
``blocks.{i}.mlp.{gate,in,out}.hook_out`` (``in`` = ``up_proj``, ``out`` = ``down_proj``).

Because the bridge wraps the HF modules in place, the hooks also fire inside
``model.hf_model(...)`` and ``model.hf_model.generate(...)`` (KV cache included), so anything
run inside ``with scaled(...)`` sees the scaled model.  Hooks are added with the bridge's own
``bridge.hooks(...)`` context: on exit (normal or by exception) exactly the hooks this context
added are removed; hooks the user attached before, permanent or not, stay.  Nested contexts
compose: scaling by α then β inside it is scaling by α·β.

``components`` chooses the projections.  ``ALL_COMPONENTS`` is the paper's description;
``PAPER_CODE_COMPONENTS`` omits ``o``, reproducing the official code before commit 8af5b13,
whose ``o_proj`` line wrote into the wrong model (PAPER.md §2) — Table 1 was very likely made so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real

import torch
from torch import Tensor

from interp.architectures import COMPONENTS, architecture_of
from interp.errors import SafetyLayersError
from interp.hooks import hook_name
from interp.models import LoadedModel
from interp.ranges import check_layers

ALL_COMPONENTS: tuple[str, ...] = COMPONENTS
"""Every projection the paper scales: attention q, k, v, o; MLP gate, up (``in``), down (``out``)."""
PAPER_CODE_COMPONENTS: tuple[str, ...] = ("q", "k", "v", "gate", "in", "out")
"""What the official code's scaling script scaled: everything but ``o_proj`` (a bug its authors later
fixed); kept to reproduce numbers made with it."""

class ScalingError(SafetyLayersError, ValueError):
    """A bad scaling request: α not a finite positive number, unknown component, bad layers."""


def check_alpha(alpha) -> float:
    """α must be a real, finite number above 0 (α ≤ 0 would flip or erase the layers)."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise ScalingError(f"alpha must be a real number, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ScalingError(f"alpha must be finite, got {alpha}")
    if alpha <= 0:
        raise ScalingError(f"alpha must be > 0, got {alpha}")
    return alpha


def check_components(components) -> tuple[str, ...]:
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    if not components:
        raise ScalingError("no components to scale")
    unknown = [c for c in components if c not in ALL_COMPONENTS]
    if unknown:
        raise ScalingError(f"unknown component(s) {unknown}; choose from {', '.join(ALL_COMPONENTS)}")
    if len(set(components)) != len(components):
        raise ScalingError(f"component list repeats an entry: {components}")
    return components


def projection_bias(model: LoadedModel, layer: int, component: str) -> Tensor | None:
    """The bias of a projection (its row block, for a fused one), from the model's own HF
    parameters (``None`` when it has none)."""
    name = model.arch.projection_weight(layer, component)[: -len("weight")] + "bias"
    if name not in model.hf_parameters:
        return None
    return model.parameter_value(name)[model.arch.row_slice(model.config, component)]


def bias_like(bias: Tensor, out: Tensor) -> Tensor:
    """``bias`` shaped to broadcast over a hook's output.  The bridge hands q/k/v outputs over
    split into heads, ``[batch, pos, head, d_head]``, so the bias is reshaped to the trailing
    dimensions whose sizes multiply to its length."""
    size = 1
    for k in range(1, out.ndim + 1):
        size *= out.shape[-k]
        if size == bias.numel():
            return bias.reshape(out.shape[-k:]).to(out.dtype)
    raise RuntimeError(
        f"cannot align a bias of {bias.numel()} values with a projection output of shape {tuple(out.shape)}"
    )


def _scale_hook(alpha: float, bias: Tensor | None):
    """A hook making ``y = W x + b`` into ``(α W) x + b``."""
    if bias is None:
        def hook(out: Tensor, hook) -> Tensor:
            return out * alpha
    else:
        def hook(out: Tensor, hook) -> Tensor:
            # α (y − b) + b  =  α y + (1 − α) b
            return torch.add(out * alpha, bias_like(bias, out), alpha=1.0 - alpha)
    return hook


def _scaled_projections(model, layers, alpha: float, components) -> list[tuple[int, str, object]]:
    """``(layer, component, fn)`` for each projection to scale, ``fn`` doing ``_scale_hook``'s
    arithmetic; every argument checked first (empty when α is 1: the unscaled model needs no hooks)."""
    alpha = check_alpha(alpha)
    layers = check_layers(layers, model.n_layers)
    components = check_components(components)
    if alpha == 1.0:
        return []
    return [(i, c, _scale_hook(alpha, projection_bias(model, i, c))) for i in layers for c in components]


def scaling_hooks(model: LoadedModel, layers, alpha: float, components=ALL_COMPONENTS) -> list[tuple[str, object]]:
    """``(hook_name, fn)`` pairs that scale ``components`` of ``layers`` by ``alpha``
    (empty when α is 1: the unscaled model needs no hooks)."""
    return [(hook_name(c, i), fn) for i, c, fn in _scaled_projections(model, layers, alpha, components)]


@contextmanager
def scaled(model: LoadedModel, layers, alpha: float, components=ALL_COMPONENTS) -> Iterator[object]:
    """Run the body with ``components`` of ``layers`` behaving as if their weights were × ``alpha``.

    ``model`` is a ``LoadedModel``; ``layers`` a ``LayerRange`` (inclusive), a layer index or a
    list of them.  Raises ``ScalingError``/``LayerRangeError`` for α ≤ 0, a non-finite α, an empty
    or out-of-range layer set, or an unknown component — before any hook is added.  Yields the
    model.  Every hook it added is removed on exit, also when the body raises.
    """
    hooks = scaling_hooks(model, layers, alpha, components)
    with model.bridge.hooks(fwd_hooks=hooks):
        yield model


def _twin_hook(scale, rows: slice):
    """A torch forward hook applying ``scale`` (a ``_scale_hook``) to a plain ``nn.Linear``'s
    output (on the component's row block only, for a fused projection)."""

    def hook(module, args, out: Tensor) -> Tensor:
        if rows == slice(None):
            return scale(out, None)
        out = out.clone()
        out[..., rows] = scale(out[..., rows], None)
        return out

    return hook


@contextmanager
def scaled_twin(model: LoadedModel, layers, alpha: float, components=ALL_COMPONENTS) -> Iterator[torch.nn.Module]:
    """``scaled`` for ``model.plain_twin()``, the unbridged module tree that shares the model's
    weights: the same ``α (y − b) + b`` on each projection's output, by torch forward hooks on its
    ``nn.Linear`` modules (bridge hook points do not exist there).  Yields the twin; raises
    ``ValueError`` for a model that has none (offloaded weights, a PEFT wrapper).  Same checks as
    ``scaled``; every hook is removed on exit."""
    twin = model.plain_twin()
    if twin is None:
        raise ValueError("this model has no plain twin (offloaded weights or a PEFT wrapper); use scaled()")
    projections = _scaled_projections(model, layers, alpha, components)
    handles = []
    try:
        for i, c, scale in projections:
            module = twin.get_submodule(model.arch.projection_weight(i, c)[: -len(".weight")])
            hook = _twin_hook(scale, model.arch.row_slice(model.config, c))
            handles.append(module.register_forward_hook(hook))
        yield twin
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def scale_weights_(hf_model: torch.nn.Module, layers, alpha: float, components=ALL_COMPONENTS) -> torch.nn.Module:
    """The paper's way, in place on a plain (unbridged) HF model of any supported family: multiply
    the projection weights (never biases, norms or embeddings) of ``layers`` by ``alpha``; a fused
    projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) has the components' row blocks multiplied.
    Used as the reference in tests and as the baseline in ``benchmarks/locate.py``."""
    alpha = check_alpha(alpha)
    components = check_components(components)
    arch = architecture_of(hf_model)
    params = dict(hf_model.named_parameters())
    for i in check_layers(layers, hf_model.config.num_hidden_layers):
        for c in components:
            params[arch.projection_weight(i, c)][arch.row_slice(hf_model.config, c)].mul_(alpha)
    return hf_model


def hook_count(bridge) -> int:
    """How many hook functions (TransformerLens handles, forward and backward) are attached to
    the bridge's hook points; used to check that a context cleaned up after itself."""
    points = {id(p): p for p in bridge.hook_points()}.values()  # a point may have several names
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


def torch_hook_count(bridge) -> int:
    """Like ``hook_count``, but counts the torch-level hooks under the TransformerLens handles."""
    points = {id(p): p for p in bridge.hook_points()}.values()
    return sum(len(p._forward_hooks) + len(p._backward_hooks) for p in points)
