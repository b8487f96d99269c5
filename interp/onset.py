"""Suggest an initial safety-layer range from a per-layer angle-gap curve.

Li et al. (§3.3) read the range off their figures: the gap between N-M and N-N angles is flat
in the early layers, starts widening at a middle layer, grows, and then levels off; the range
"from the appearance of the gap to its increase until the first smoothing" is the initial
range that §3.4's scaling search then refines.  The paper gives no numeric rule, so this module
states one and returns the numbers behind its decision:

1. **Baseline.**  The first ``baseline_layers`` layers are the early-layer level:
   ``baseline = mean``, ``spread = sd`` (ddof 1) of the gap there.
2. **Rise.**  ``peak`` is the layer of the largest gap after the baseline window and
   ``rise = gap[peak] - baseline``.  A rise below ``min_rise`` degrees is no gap at all
   (``range`` is ``None``).
3. **Onset.**  ``threshold = baseline + max(k_sd * spread, onset_frac * rise)``; the onset is the
   first layer after the baseline window whose gap exceeds the threshold and stays above it for
   ``persist`` consecutive layers (fewer at the very end of the model).
4. **Plateau.**  The first layer from the onset on whose gap reaches ``plateau_frac`` of the
   rise (``gap >= baseline + plateau_frac * rise``): where the widening has mostly happened and
   the curve levels off.  (If the peak was a lone spike before the onset and no later layer
   reaches that level, the highest layer from the onset on.)

The suggestion is ``LayerRange(onset, plateau)``, both inclusive and 0-indexed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from interp.ranges import LayerRange


@dataclass(frozen=True)
class OnsetRule:
    """Parameters of the rule in the module docstring (gap values in degrees)."""

    baseline_layers: int = 5
    k_sd: float = 3.0
    onset_frac: float = 0.25
    persist: int = 3
    plateau_frac: float = 0.8
    min_rise: float = 2.0

    def __post_init__(self):
        if self.baseline_layers < 2:
            raise ValueError("baseline_layers must be at least 2 (its spread needs two values)")
        if self.persist < 1:
            raise ValueError("persist must be at least 1")
        if not 0 < self.onset_frac <= 1 or not 0 < self.plateau_frac <= 1:
            raise ValueError("onset_frac and plateau_frac must lie in (0, 1]")
        if self.k_sd < 0 or self.min_rise < 0:
            raise ValueError("k_sd and min_rise must not be negative")


@dataclass
class OnsetResult:
    """The suggested range (``None`` when the curve shows no clear rise) and why."""

    range: LayerRange | None
    onset: int | None
    plateau: int | None
    baseline: float
    spread: float
    threshold: float | None
    peak: int
    rise: float
    rule: OnsetRule
    reason: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["range"] = None if self.range is None else [self.range.start, self.range.end]
        return out


def suggest_initial_range(gap, rule: OnsetRule | None = None) -> OnsetResult:
    """Apply the rule of the module docstring to a per-layer gap curve (degrees)."""
    rule = rule or OnsetRule()
    gap = np.asarray(gap, dtype=float)
    if gap.ndim != 1:
        raise ValueError(f"the gap curve must be one value per layer, got shape {gap.shape}")
    if not np.isfinite(gap).all():
        raise ValueError("the gap curve holds NaN or infinite values")
    w = rule.baseline_layers
    if len(gap) < w + 1:
        raise ValueError(f"a curve of {len(gap)} layers is too short for a baseline of {w} layers plus one more")
    baseline, spread = float(gap[:w].mean()), float(gap[:w].std(ddof=1))
    peak = int(w + np.argmax(gap[w:]))
    rise = float(gap[peak] - baseline)
    common = {"baseline": baseline, "spread": spread, "peak": peak, "rise": rise, "rule": rule}
    if rise < rule.min_rise:
        return OnsetResult(None, None, None, threshold=None, **common, reason=(
            f"no clear rise: the largest gap after layer {w - 1} ({gap[peak]:.2f} deg at layer {peak}) is "
            f"{rise:.2f} deg above the early-layer level {baseline:.2f}, below min_rise {rule.min_rise}"
        ))
    threshold = baseline + max(rule.k_sd * spread, rule.onset_frac * rise)
    above = gap > threshold
    onset = next(
        (layer for layer in range(w, len(gap)) if above[layer:layer + rule.persist].all()), None
    )
    if onset is None:
        return OnsetResult(None, None, None, threshold=threshold, **common, reason=(
            f"the gap never stays above {threshold:.2f} deg (baseline {baseline:.2f} + "
            f"max({rule.k_sd} x sd {spread:.2f}, {rule.onset_frac} x rise {rise:.2f})) "
            f"for {rule.persist} layers"
        ))
    level = baseline + rule.plateau_frac * rise
    # the peak can be a lone spike before the onset: then take the highest layer after the onset
    plateau = next((layer for layer in range(onset, len(gap)) if gap[layer] >= level), None)
    if plateau is None:
        plateau = int(onset + np.argmax(gap[onset:]))
    return OnsetResult(LayerRange(onset, plateau), onset, plateau, threshold=threshold, **common, reason=(
        f"onset {onset}: first layer whose gap stays above {threshold:.2f} deg for {rule.persist} layers "
        f"(baseline {baseline:.2f} +- {spread:.2f} over layers 0-{w - 1}); plateau {plateau}: first layer "
        f"reaching {level:.2f} deg, {rule.plateau_frac:.0%} of the rise of {rise:.2f} deg (peak at layer {peak})"
    ))
