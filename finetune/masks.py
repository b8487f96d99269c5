"""Gradient masks: keep chosen weights of a model fixed while the rest trains.

SPPFT (Li et al., §4) fine-tunes everything except the safety layers.  Here a layer range is
frozen by registering a tensor hook (``Tensor.register_hook``) on each attention and MLP
parameter of those layers that returns a zero gradient.  The same mechanism takes element masks
(a boolean tensor per parameter, ``True`` = frozen): the hook multiplies the gradient by the
mask's complement, so only the chosen rows, columns, neurons or heads stay put.

The hooks sit on the model's **original Hugging Face parameters**, found by their HF names in
``LoadedModel.hf_parameters`` (recorded before TransformerLens's bridge wraps the modules, so the
names are the checkpoint's: ``model.layers.3.self_attn.qkv_proj.weight`` on Phi-3, not the
bridge's split copies).  Those are the tensors the forward pass uses, bridged or not (tested by
perturbing them).  Which parameters a layer's attention and MLP hold is the architecture
table's business (``interp.architectures``); norms stay trainable unless ``include_norms=True``,
as in the paper's code.

A zero gradient alone does **not** keep a weight fixed under AdamW: decoupled weight decay
shrinks every weight it is given, and momentum carries earlier updates on.  So
``finetune.train`` also

- leaves fully masked parameters out of the optimizer altogether (no state, no decay), and
- puts element-masked parameters in a zero-weight-decay group (their masked elements then get
  a zero first moment and a zero update, since AdamW's step is ``m / (sqrt(v) + eps)`` with
  ``m = v = 0``) and, as a guarantee that holds for any optimizer, writes the saved values of
  the masked elements back after every optimizer step (``MaskHandle.restore``).  The unmasked
  elements of such a parameter therefore train without weight decay.

Tensor hooks need the parameters the forward uses to be the ones hooked; sharding
(``finetune.sharded``) replaces them, so there whole layers are frozen by ``requires_grad=False``
and element masks are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from interp.architectures import architecture_of
from interp.ranges import LayerRange, LayerRangeError, check_layer, check_layers


def named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the model once (a tied weight under its first name), by HF name: a
    ``LoadedModel``'s ``hf_parameters``, or an unbridged HF module's own names."""
    params = model.hf_parameters if hasattr(model, "hf_parameters") else dict(model.named_parameters())
    seen, out = set(), {}
    for name, param in params.items():
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def _arch(model):
    return model.arch if hasattr(model, "arch") else architecture_of(model)


def n_layers_of(model) -> int:
    config = getattr(model, "config", None) or model.hf_model.config
    return int(config.num_hidden_layers)


def layer_parameters(model, layers, include_norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """The attention and MLP parameters (weights and any biases) of the given decoder layers,
    plus their norms if ``include_norms`` (``interp.architectures``)."""
    params = named_parameters(model)
    layers = check_layers(layers, n_layers_of(model))
    names = _arch(model).block_parameter_names(params, layers, include_norms)
    return {name: params[name] for name in names}


def resolve_range(spec, model=None) -> LayerRange:
    """A ``LayerRange`` from a ``LayerRange``, a ``"6,12"`` string, or the JSON file that
    ``interp.export`` writes (read by ``interp.export.load_located``, which refuses a file made
    for another model).  With ``model`` the range is checked against its layer count."""
    if isinstance(spec, LayerRange):
        layer_range = spec
    elif isinstance(spec, (str, Path)) and (str(spec).endswith(".json") or Path(spec).is_file()):
        layer_range = _range_from_json(Path(spec), model)
    elif isinstance(spec, str):
        layer_range = LayerRange.parse(spec)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        layer_range = LayerRange(int(spec[0]), int(spec[1]))
    else:
        raise LayerRangeError(f"cannot read a layer range from {spec!r}")
    if model is not None:
        layer_range.check(n_layers_of(model))
    return layer_range


def paper_freeze_range(begin_num: int, end_num: int, n_layers: int) -> LayerRange:
    """The layers the official ``SPPFT.py`` freezes for ``--begin_num/--end_num``: its test is
    ``begin_num < l < end_num`` (strict at both ends), so ``--begin_num 5 --end_num 15`` freezes
    the paper's [6,14]."""
    return LayerRange(begin_num + 1, end_num - 1).check(n_layers)


def _range_from_json(path: Path, model) -> LayerRange:
    from interp.export import load_located

    return load_located(path, model=model).range


@dataclass
class MaskHandle:
    """What ``freeze_layers``/``freeze_elements`` registered.

    ``frozen`` maps canonical names to wholly frozen parameters; ``partial`` maps names to
    ``(parameter, mask)`` with ``mask`` True on the frozen elements.  ``remove()`` takes the
    hooks off (gradients flow again); ``restore()`` writes back the saved values of the
    masked elements (called by the trainer after each optimizer step)."""

    frozen: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    partial: dict[str, tuple[torch.nn.Parameter, Tensor]] = field(default_factory=dict)
    layer_range: LayerRange | None = None
    _hooks: list = field(default_factory=list, repr=False)
    _saved: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.frozen) + list(self.partial)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def frozen_ids(self) -> set[int]:
        return {id(p) for p in self.frozen.values()}

    def partial_ids(self) -> set[int]:
        return {id(p) for p, _ in self.partial.values()}

    def n_frozen_elements(self) -> int:
        return sum(p.numel() for p in self.frozen.values()) + sum(int(m.sum()) for _, m in self.partial.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back into the masked elements (whole frozen parameters are
        left to the optimizer, which never sees them)."""
        for name, (param, mask) in self.partial.items():
            param[mask] = self._saved[name].to(param.device, param.dtype)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def merge(self, other: "MaskHandle") -> "MaskHandle":
        """One handle holding both handles' masks and hooks."""
        return MaskHandle(
            frozen={**self.frozen, **other.frozen},
            partial={**self.partial, **other.partial},
            layer_range=self.layer_range or other.layer_range,
            _hooks=self._hooks + other._hooks,
            _saved={**self._saved, **other._saved},
        )

    def describe(self) -> dict:
        return {
            "range": [self.layer_range.start, self.layer_range.end] if self.layer_range else None,
            "frozen_parameters": list(self.frozen),
            "element_masked_parameters": {n: int(m.sum()) for n, (_, m) in self.partial.items()},
            "frozen_elements": self.n_frozen_elements(),
        }


def _zero_grad(grad: Tensor) -> Tensor:
    return torch.zeros_like(grad)


def freeze_layers(model, layers, include_norms: bool = False) -> MaskHandle:
    """Zero the gradients of every attention and MLP parameter of a layer range.

    ``layers``: a ``LayerRange``, ``"6,12"``, a ``(start, end)`` tuple, a located-range JSON
    path, or a list/set of layer indices.  Raises ``LayerRangeError`` for a range outside the model."""
    if isinstance(layers, (list, set, range)):
        indices, layer_range = check_layers(layers, n_layers_of(model)), None
    else:
        layer_range = resolve_range(layers, model)
        indices = layer_range.layers
    params = layer_parameters(model, indices, include_norms)
    handle = MaskHandle(frozen=params, layer_range=layer_range)
    # a parameter that does not require grad gets no gradient to zero, and cannot take a hook
    handle._hooks = [p.register_hook(_zero_grad) for p in params.values() if p.requires_grad]
    return handle


def freeze_elements(model, masks: dict[str, Tensor]) -> MaskHandle:
    """Freeze chosen elements: ``masks`` maps a parameter's canonical name to a boolean tensor
    of its shape, True where the weight must stay fixed.  The gradient is multiplied by
    ``~mask``; the masked values are saved for ``MaskHandle.restore``."""
    params = named_parameters(model)
    handle = MaskHandle()
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"no parameter named {name!r} (names look like {next(iter(params))!r})")
        param = params[name]
        mask = torch.as_tensor(mask, dtype=torch.bool, device=param.device)
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
        if not param.requires_grad:
            raise ValueError(f"{name} does not require grad: call requires_grad_(True) before masking its elements")
        keep = (~mask).to(param.dtype)
        handle.partial[name] = (param, mask)
        handle._saved[name] = param.detach()[mask].clone()
        handle._hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep))
    return handle


def _axis_mask(param: Tensor, axis: str, indices) -> Tensor:
    mask = torch.zeros_like(param, dtype=torch.bool)
    if axis == "rows":
        mask[list(indices)] = True
    else:
        mask[:, list(indices)] = True
    return mask


def _merge_masks(model, layer: int, parts: dict[str, tuple[str, list[int]]]) -> dict[str, Tensor]:
    """Element masks by HF weight name from ``{component: (axis, indices)}`` (components of one
    fused weight share its mask)."""
    params, arch = named_parameters(model), _arch(model)
    out: dict[str, Tensor] = {}
    for component, (axis, indices) in parts.items():
        name = arch.projection_weight(check_layer(layer, n_layers_of(model)), component)
        mask = _axis_mask(params[name], axis, indices)
        out[name] = out[name] | mask if name in out else mask
    return out


def row_mask(model, name: str, rows) -> dict[str, Tensor]:
    """An element mask freezing whole output rows of one weight, by HF name."""
    return {name: _axis_mask(named_parameters(model)[name], "rows", rows)}


def neuron_mask(model, layer: int, neurons) -> dict[str, Tensor]:
    """An element mask freezing whole MLP neurons of one layer: their rows of the gate and up
    projections and their columns of the down projection."""
    config = getattr(model, "config", None) or model.hf_model.config
    neurons = [int(n) for n in neurons]
    if any(not 0 <= n < config.intermediate_size for n in neurons):
        raise ValueError(f"neurons must lie in 0..{config.intermediate_size - 1}")
    return _merge_masks(model, layer, _arch(model).neuron_rows(config, neurons))


def head_mask(model, layer: int, heads) -> dict[str, Tensor]:
    """An element mask freezing whole attention heads of one layer: their rows of the query
    projection and their columns of the output projection (K/V heads are shared under
    grouped-query attention and are left trainable)."""
    config = getattr(model, "config", None) or model.hf_model.config
    heads = [int(h) for h in heads]
    if any(not 0 <= h < config.num_attention_heads for h in heads):
        raise ValueError(f"heads must lie in 0..{config.num_attention_heads - 1}")
    return _merge_masks(model, layer, _arch(model).head_rows(config, heads))


def merge_element_masks(*masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """One mask dict holding the union of several."""
    out: dict[str, Tensor] = {}
    for part in masks:
        for name, mask in part.items():
            out[name] = out[name] | mask if name in out else mask.clone()
    return out


def ablation_range(safety: LayerRange, n_layers: int, at: str = "start") -> LayerRange:
    """A range of the same size as ``safety`` that does not overlap it, for the paper's
    "freeze other layers" ablation (Table 8): at the start of the model if it fits there,
    else at the end."""
    size = len(safety)
    candidates = {"start": LayerRange(0, size - 1), "end": LayerRange(n_layers - size, n_layers - 1)}
    order = [at] + [k for k in candidates if k != at]
    for key in order:
        rng = candidates[key]
        if rng.start >= 0 and (rng.end < safety.start or rng.start > safety.end):
            return rng.check(n_layers)
    raise LayerRangeError(f"no range of {size} layers outside {safety} fits a model of {n_layers} layers")
