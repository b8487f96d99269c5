"""Locate the safety layers precisely: the paper's bound search over scaled layer ranges.

Li et al. §3.4.3 (PAPER.md §2), all ranges 0-indexed and inclusive:

1. Start from an initial range ``[i, j]`` (read off the angle-gap curve: ``interp.onset``) and
   measure the baseline R_o of the unscaled model.
2. With α > 1, scale ``[i, j+k]`` for each offset ``k`` of a window and take the upper bound
   ``j_u = j+k`` whose R_o is largest.
3. Then scale ``[i-k, j_u]`` for each ``k`` and take the lower bound with the largest R_o.
4. With α < 1 take the smallest R_o instead, both times.

``search_bounds`` runs these sweeps with any R_o function ``ro(range, alpha) -> number`` (``range`` is
a ``LayerRange``, or ``None`` for the unscaled baseline), so tests can plant a synthetic one and
the search can run on the first-step estimate.  Ties go to the offset nearest 0 (the range
closest to the initial one), then to the smaller offset.  Each configuration is evaluated
once: the lower sweep's ``k = 0`` row reuses the upper sweep's winner.

*Coarse to fine.*  With ``confirm=fine_ro`` every candidate is first scored by ``ro`` (e.g. the
first-step estimate, ``estimate_ro``), and only the ``keep`` best of each sweep are measured by
``fine_ro`` (e.g. generated R_o, ``generation_ro``), together with any row whose fine value is
already known (the upper winner reappears in the lower sweep); the winner is the best
*confirmed* row.

*Choosing α* (App. A.3.4): ``choose_alpha`` steps α away from 1 by 0.05 and runs the search at
each α until the standard deviation of R_o over the lower-bound sweep first reaches a target
(the paper's N_u ≈ 15-20 on 721 queries; scale it with the number of prompts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from interp.ranges import LayerRange, LayerRangeError
from interp.scaling import check_alpha

RoFunction = Callable[[LayerRange | None, float], float]
"""``ro(range, alpha)``: R_o of the model with ``range`` scaled by ``alpha`` (``None``: unscaled)."""


@dataclass(frozen=True)
class SweepRow:
    """One evaluated configuration.  ``r_o`` is the value the decision used (``None`` when a
    coarse-to-fine search did not confirm the row); ``estimate`` the coarse score, if any."""

    phase: str  # "baseline", "upper" or "lower"
    range: LayerRange | None
    alpha: float
    offset: int | None
    r_o: float | None
    estimate: float | None = None
    winner: bool = False
    pruned: bool = False

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "start": None if self.range is None else self.range.start,
            "end": None if self.range is None else self.range.end,
            "alpha": self.alpha,
            "offset": self.offset,
            "r_o": self.r_o,
            "estimate": self.estimate,
            "winner": self.winner,
            "pruned": self.pruned,
        }


@dataclass
class BoundSearch:
    """The two sweeps and their outcome (``range``: the located safety layers)."""

    initial: LayerRange
    alpha: float
    baseline: float
    upper: list[SweepRow]
    lower: list[SweepRow]
    range: LayerRange
    n_layers: int
    baseline_estimate: float | None = None

    @property
    def direction(self) -> str:
        return "max" if self.alpha > 1 else "min"

    @property
    def upper_end(self) -> int:
        return self.range.end

    @property
    def located_r_o(self) -> float | None:
        """R_o of the located range (the lower sweep's winner; the upper one's if there is no
        lower sweep), the value a comparison of searches from different starts ranks by."""
        for rows in (self.lower, self.upper):
            for row in rows:
                if row.winner and row.range == self.range and row.r_o is not None:
                    return row.r_o
        return None

    @property
    def rows(self) -> list[SweepRow]:
        base = SweepRow("baseline", None, 1.0, None, self.baseline, self.baseline_estimate)
        return [base, *self.upper, *self.lower]

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([r.to_dict() for r in self.rows])
        for column in ("start", "end", "offset"):  # the baseline row has none: keep integers
            frame[column] = frame[column].astype("Int64")
        return frame

    def lower_std(self, ddof: int = 0) -> float:
        """Spread of R_o over the lower-bound sweep (the quantity the α rule watches)."""
        values = [r.r_o for r in self.lower if r.r_o is not None]
        return float(np.std(values, ddof=ddof)) if len(values) > ddof else 0.0

    def table(self) -> str:
        """The sweeps as the paper's Table 1 prints them: range and R_o, winner starred."""
        def fmt(rows):
            cells = []
            for r in rows:
                value = "-" if r.r_o is None else _num(r.r_o)
                if r.estimate is not None:
                    value += f" (est {_num(r.estimate)})"
                cells.append(f"{r.range} {value}{'*' if r.winner else ''}")
            return ", ".join(cells)

        base = _num(self.baseline)
        if self.baseline_estimate is not None:
            base += f" (est {_num(self.baseline_estimate)})"
        return "\n".join([
            f"alpha {self.alpha:g} ({self.direction} R_o), initial {self.initial}, baseline R_o {base}",
            f"  upper-bound sweep: {fmt(self.upper)}",
            f"  lower-bound sweep: {fmt(self.lower)}",
            f"  located: {self.range}",
        ])


def _num(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def offsets_for(window: int) -> list[int]:
    """``-window .. +window``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative integer, got {window!r}")
    return list(range(-window, window + 1))


def upper_candidates(initial: LayerRange, offsets: Iterable[int], n_layers: int) -> list[tuple[int, LayerRange]]:
    """``[i, j+k]`` for each offset that gives a valid range inside the model."""
    return [(k, LayerRange(initial.start, initial.end + k)) for k in offsets
            if initial.start <= initial.end + k < n_layers]


def lower_candidates(start: int, end: int, offsets: Iterable[int]) -> list[tuple[int, LayerRange]]:
    """``[i-k, end]`` for each offset that gives a valid range (``0 <= i-k <= end``)."""
    return [(k, LayerRange(start - k, end)) for k in offsets if 0 <= start - k <= end]


def _best(rows: list[SweepRow], alpha: float) -> int:
    """Index of the winning row: best ``r_o`` (max for α > 1, min for α < 1); ties to the offset
    nearest 0, then the smaller offset."""
    sign = -1.0 if alpha > 1 else 1.0
    scored = [(sign * r.r_o, abs(r.offset), r.offset, n) for n, r in enumerate(rows) if r.r_o is not None]
    if not scored:
        raise ValueError("no row of the sweep has an R_o value")
    return min(scored)[-1]


def _finite(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the R_o function returned {value} for {what}")
    return value


class _Memo:
    """Each configuration evaluated once per function."""

    def __init__(self, fn: RoFunction):
        self.fn, self.values = fn, {}

    @staticmethod
    def key(layer_range: LayerRange | None, alpha: float):
        return layer_range, (alpha if layer_range is not None else 1.0)

    def known(self, layer_range: LayerRange | None, alpha: float) -> bool:
        return self.key(layer_range, alpha) in self.values

    def __call__(self, layer_range: LayerRange | None, alpha: float) -> float:
        key = self.key(layer_range, alpha)
        if key not in self.values:
            self.values[key] = _finite(self.fn(layer_range, alpha), f"{layer_range} x {alpha}")
        return self.values[key]


def _sweep(phase, candidates, alpha, ro: _Memo, confirm: _Memo | None, keep: int, bound=None) -> list[SweepRow]:
    if not candidates:
        raise LayerRangeError(f"the {phase}-bound sweep has no valid range inside the model")
    if bound is not None and alpha > 1:
        rows = _pruned_sweep(phase, candidates, alpha, ro, bound)
    elif confirm is None:
        rows = [SweepRow(phase, r, alpha, k, ro(r, alpha)) for k, r in candidates]
    else:
        coarse = [SweepRow(phase, r, alpha, k, None, ro(r, alpha)) for k, r in candidates]
        # the best `keep` by the coarse score, plus any row already confirmed (e.g. the lower
        # sweep's k = 0 row, the upper sweep's winner): it costs nothing and may well win
        known = {n for n, c in enumerate(coarse) if confirm.known(c.range, alpha)}
        chosen = set(_rank(coarse, alpha)[:keep]) | known
        rows = [
            SweepRow(phase, c.range, alpha, c.offset, confirm(c.range, alpha), c.estimate) if n in chosen else c
            for n, c in enumerate(coarse)
        ]
    win = _best(rows, alpha)
    return [SweepRow(**{**r.__dict__, "winner": n == win}) for n, r in enumerate(rows)]


def _pruned_sweep(phase, candidates, alpha, ro: _Memo, bound) -> list[SweepRow]:
    """Measure candidates best bound first (known values first); skip one whose upper bound,
    asked when its turn comes, is below the best value measured so far: it cannot win (ties
    are measured, since the tie rule may prefer them)."""
    bounds = {n: float(bound(r, alpha)) for n, (_, r) in enumerate(candidates)}
    order = sorted(bounds, key=lambda n: (not ro.known(candidates[n][1], alpha), -bounds[n],
                                          abs(candidates[n][0]), candidates[n][0]))
    rows: dict[int, SweepRow] = {}
    best = None
    for n in order:
        k, r = candidates[n]
        ceiling = float(bound(r, alpha))
        if best is not None and not ro.known(r, alpha) and ceiling < best:
            rows[n] = SweepRow(phase, r, alpha, k, None, ceiling, pruned=True)
            continue
        value = ro(r, alpha)
        rows[n] = SweepRow(phase, r, alpha, k, value, ceiling)
        best = value if best is None else max(best, value)
    return [rows[n] for n in range(len(candidates))]


def _grown(offsets: list[int], winner: int, make) -> list[int] | None:
    """``offsets`` with one more offset past the edge the winner sits on, or ``None`` when the
    winner is inside the valid offsets or the next one would leave the model."""
    valid = [k for k in offsets if make([k])]
    if winner == max(valid) and make([winner + 1]):
        return sorted({*offsets, winner + 1})
    if winner == min(valid) and make([winner - 1]):
        return sorted({*offsets, winner - 1})
    return None


def _rank(rows: list[SweepRow], alpha: float) -> list[int]:
    """Row indices ordered best first by their coarse ``estimate`` (same tie rule as ``_best``)."""
    sign = -1.0 if alpha > 1 else 1.0
    return [n for *_, n in sorted((sign * r.estimate, abs(r.offset), r.offset, n) for n, r in enumerate(rows))]


def search_bounds(
    ro: RoFunction,
    initial: LayerRange,
    alpha: float,
    n_layers: int,
    *,
    window: int = 2,
    upper_offsets: Iterable[int] | None = None,
    lower_offsets: Iterable[int] | None = None,
    confirm: RoFunction | None = None,
    keep: int = 2,
    bound: RoFunction | None = None,
    extend: bool = False,
) -> BoundSearch:
    """The paper's two-sweep bound search (module docstring).

    ``initial``: the starting range (inclusive); ``alpha``: the scale (≠ 1); ``window``: offsets
    ``-window..window`` for both sweeps unless ``upper_offsets``/``lower_offsets`` are given
    (Table 1's lower sweeps, e.g. ``[8,12] .. [4,12]`` from ``[7,12]``, are offsets -1..3).
    ``confirm``/``keep``: the coarse-to-fine mode.  ``bound``: an upper bound on ``ro`` that
    lets a sweep skip candidates that cannot win (α > 1 only; see ``_pruned_sweep``).
    ``extend``: when a sweep's winner sits at the edge of its offsets, add the next offset past
    that edge and sweep again (each range is measured once), until the winner is inside its
    window or the model's edge is reached, so the result does not depend on the window's width.
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        raise ValueError("alpha must differ from 1: scaling by 1 changes nothing to search over")
    if not isinstance(initial, LayerRange):
        raise TypeError(f"initial must be a LayerRange, got {initial!r}")
    initial.check(n_layers)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    upper_offsets = offsets_for(window) if upper_offsets is None else list(upper_offsets)
    lower_offsets = offsets_for(window) if lower_offsets is None else list(lower_offsets)
    coarse, fine = _Memo(ro), (_Memo(confirm) if confirm is not None else None)
    main = fine or coarse
    baseline = main(None, 1.0)
    baseline_estimate = coarse(None, 1.0) if fine is not None else None

    def search(phase, make, offsets):
        while True:
            rows = _sweep(phase, make(offsets), alpha, coarse, fine, keep, bound)
            grown = _grown(offsets, next(r for r in rows if r.winner).offset, make) if extend else None
            if grown is None:
                return rows
            offsets = grown

    upper = search("upper", lambda offs: upper_candidates(initial, offs, n_layers), upper_offsets)
    end_u = next(r for r in upper if r.winner).range.end
    lower = search("lower", lambda offs: lower_candidates(initial.start, end_u, offs), lower_offsets)
    located = next(r for r in lower if r.winner).range
    return BoundSearch(initial, alpha, baseline, upper, lower, located, n_layers, baseline_estimate)


# --- choosing alpha ---------------------------------------------------------------------------


@dataclass
class AlphaChoice:
    """The α rule's outcome: the first α whose lower-sweep std reached ``target_std``
    (``reached`` False: none did within ``max_steps``; ``alpha`` is then the last one tried)."""

    alpha: float
    reached: bool
    target_std: float
    trials: list[tuple[float, float, BoundSearch]] = field(default_factory=list)  # (alpha, std, result)

    @property
    def result(self) -> BoundSearch:
        return self.trials[-1][2]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "reached": self.reached,
            "target_std": self.target_std,
            "trials": [{"alpha": a, "lower_std": s, "range": [r.range.start, r.range.end]} for a, s, r in self.trials],
        }


def choose_alpha(
    ro: RoFunction,
    initial: LayerRange,
    n_layers: int,
    *,
    increase: bool = True,
    step: float = 0.05,
    target_std: float = 15.0,
    max_steps: int = 10,
    ddof: int = 0,
    **locate_kwargs,
) -> AlphaChoice:
    """Step α = 1 ± step, 1 ± 2·step, ... (up when ``increase``), running ``locate`` at each, until
    the std of R_o over the lower-bound sweep reaches ``target_std`` (App. A.3.4)."""
    if not step > 0 or not math.isfinite(step):
        raise ValueError(f"step must be a positive number, got {step}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    choice = AlphaChoice(alpha=1.0, reached=False, target_std=target_std)
    for n in range(1, max_steps + 1):
        alpha = round(1.0 + n * step if increase else 1.0 - n * step, 10)
        if alpha <= 0:
            break
        result = search_bounds(ro, initial, alpha, n_layers, **locate_kwargs)
        std = result.lower_std(ddof)
        choice.trials.append((alpha, std, result))
        choice.alpha = alpha
        if std >= target_std:
            choice.reached = True
            break
    if not choice.trials:
        raise ValueError(f"no alpha to try: step {step} reaches 0 at once")
    return choice


def lowest_layer(initial: LayerRange, n_layers: int, window: int = 2, lower_offsets=None) -> int:
    """The lowest layer any configuration of a search can scale (where an estimator may start)."""
    offsets = offsets_for(window) if lower_offsets is None else list(lower_offsets)
    return max(0, min(initial.start - max(offsets), initial.start)) if offsets else initial.start
