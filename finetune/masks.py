"""Gradient masks: keep chosen weights of a model fixed while the rest trains.

SPPFT (Li et al., §4) fine-tunes everything except the safety layers.  Here a layer range is
frozen by registering a tensor hook (``Tensor.register_hook``) on each attention and MLP
weight of those layers that returns a zero gradient.  The same mechanism takes element masks
(a boolean tensor per parameter, ``True`` = frozen): the hook multiplies the gradient by the
mask's complement, so only the chosen rows, columns or heads stay put.

A zero gradient alone does **not** keep a weight fixed under AdamW: decoupled weight decay
shrinks every weight it is given, and momentum carries earlier updates on.  So
``finetune.train`` also

- leaves fully masked parameters out of the optimizer altogether (no state, no decay), and
- puts element-masked parameters in a zero-weight-decay group (their masked elements then get
  a zero first moment and a zero update, since AdamW's step is ``m / (sqrt(v) + eps)`` with
  ``m = v = 0``) and, as a guarantee that holds for any optimizer, writes the saved values of
  the masked elements back after every optimizer step (``MaskHandle.restore``).  The unmasked
  elements of such a parameter therefore train without weight decay.

Parameters are found by name in the HF model (``model.hf_model.named_parameters()``), which
works whether or not TransformerLens's bridge wraps the modules (the bridge inserts
``._original_component`` into the names; ``canonical_name`` removes it).  RMSNorm weights stay
trainable unless ``include_norms=True``, as in the paper's code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from interp.ranges import LayerRange, LayerRangeError

PARTS = ("self_attn", "mlp")
NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def canonical_name(name: str) -> str:
    """A parameter's plain HF name: the bridge's ``._original_component`` segments removed."""
    return name.replace("._original_component", "").replace("_original_component.", "")


def hf_model_of(model) -> torch.nn.Module:
    """The HF module of a ``LoadedModel``, or the module itself."""
    return getattr(model, "hf_model", model)


def named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the HF model once (tied weights once), by canonical name."""
    return {canonical_name(n): p for n, p in hf_model_of(model).named_parameters()}


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_parameters(model, layers, include_norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """The attention and MLP parameters (weights and any biases) of the given decoder layers,
    plus their RMSNorm weights if ``include_norms``."""
    wanted = set(layers)
    parts = PARTS + (NORMS if include_norms else ())
    found = {}
    for name, param in named_parameters(model).items():
        if layer_of(name) in wanted and any(f".{part}." in name for part in parts):
            found[name] = param
    missing = wanted - {layer_of(n) for n in found}
    if missing:
        raise LayerRangeError(f"no attention/MLP parameters found for layer(s) {sorted(missing)}")
    return found


def n_layers_of(model) -> int:
    n = getattr(model, "n_layers", None)
    return int(n if n is not None else hf_model_of(model).config.num_hidden_layers)


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
        indices = sorted(set(int(i) for i in layers))
        if not indices or indices[0] < 0 or indices[-1] >= n_layers_of(model):
            raise LayerRangeError(f"layers {indices} do not fit a model of {n_layers_of(model)} layers")
        layer_range = None
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


def row_mask(model, name: str, rows) -> dict[str, Tensor]:
    """An element mask freezing whole output rows of one weight (e.g. some MLP neurons of
    ``up_proj``/``gate_proj``, or input columns of ``down_proj`` via its transpose)."""
    param = named_parameters(model)[name]
    mask = torch.zeros_like(param, dtype=torch.bool)
    mask[list(rows)] = True
    return {name: mask}


def head_mask(model, layer: int, heads) -> dict[str, Tensor]:
    """An element mask freezing whole attention heads of one layer: their rows of ``q_proj``
    and their columns of ``o_proj`` (K/V heads are shared under grouped-query attention and are
    left trainable)."""
    params = named_parameters(model)
    prefix = next(n for n in params if layer_of(n) == layer and n.endswith("self_attn.q_proj.weight"))
    prefix = prefix[: -len("q_proj.weight")]
    q, o = params[prefix + "q_proj.weight"], params[prefix + "o_proj.weight"]
    config = hf_model_of(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_mask = torch.zeros_like(q, dtype=torch.bool)
    o_mask = torch.zeros_like(o, dtype=torch.bool)
    for h in heads:
        if not 0 <= h < config.num_attention_heads:
            raise ValueError(f"head {h} out of range (0..{config.num_attention_heads - 1})")
        q_mask[h * head_dim : (h + 1) * head_dim] = True
        o_mask[:, h * head_dim : (h + 1) * head_dim] = True
    return {prefix + "q_proj.weight": q_mask, prefix + "o_proj.weight": o_mask}


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
