"""Layer ranges: 0-indexed and inclusive at both ends, as the paper reports them
(its code's ``range(begin, end)`` is end-exclusive; ``LayerRange(6, 14)`` is the paper's
[6,14], i.e. ``scaling(start=6, end=15)`` in that code)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from interp.errors import SafetyLayersError


class LayerRangeError(SafetyLayersError, ValueError, IndexError):
    """A layer range that is empty, reversed or outside the model."""


@dataclass(frozen=True, order=True)
class LayerRange:
    start: int
    end: int  # inclusive

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise LayerRangeError(f"layer range bounds must be integers, got {self.start!r}, {self.end!r}")
        if self.start < 0 or self.end < self.start:
            raise LayerRangeError(f"invalid layer range [{self.start},{self.end}]: need 0 <= start <= end")

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __str__(self) -> str:
        return f"[{self.start},{self.end}]"

    def check(self, n_layers: int) -> "LayerRange":
        """Raise unless every layer of the range exists in a model of ``n_layers`` layers."""
        if self.end >= n_layers:
            raise LayerRangeError(
                f"layer range {self} does not fit a model of {n_layers} layers (valid: 0..{n_layers - 1})"
            )
        return self

    @classmethod
    def parse(cls, text: str) -> "LayerRange":
        """Parse ``"6,14"``, ``"6-14"`` or ``"[6,14]"``."""
        cleaned = text.strip().strip("[]()").replace("-", ",").replace(":", ",")
        parts = [p for p in cleaned.split(",") if p.strip()]
        if len(parts) != 2:
            raise LayerRangeError(f"cannot read a layer range from {text!r}; write it as START,END")
        try:
            start, end = int(parts[0]), int(parts[1])
        except ValueError:
            raise LayerRangeError(f"cannot read a layer range from {text!r}; write it as START,END") from None
        return cls(start, end)


def check_layer(layer, n_layers: int) -> int:
    """One layer index of a model of ``n_layers`` layers (``LayerRangeError`` otherwise)."""
    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        raise LayerRangeError(f"layer indices must be integers, got {layer!r}") from None
    if not 0 <= layer < n_layers:
        raise LayerRangeError(f"layer {layer} is outside this model's layers 0..{n_layers - 1}")
    return layer


def check_layers(layers, n_layers: int) -> list[int]:
    """The one layer validator: a ``LayerRange``, one index or an iterable of distinct indices
    (``None``: every layer) as a sorted list of layers that all exist in a model of ``n_layers``
    layers.  Raises ``LayerRangeError`` (also an ``IndexError``) otherwise."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, LayerRange):
        return layers.check(n_layers).layers
    if isinstance(layers, bool) or hasattr(layers, "__index__"):
        return [check_layer(layers, n_layers)]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise LayerRangeError(f"layers must be a LayerRange or integers, got {layers!r}")
    layers = [check_layer(layer, n_layers) for layer in layers]
    if not layers:
        raise LayerRangeError("the layer list is empty")
    if len(set(layers)) != len(layers):
        raise LayerRangeError(f"the layer list repeats a layer: {layers}")
    return sorted(layers)
