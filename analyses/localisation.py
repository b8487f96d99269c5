"""The localisations of the safety layers side by side: the existence analysis's gap onset and
plateau, the scaling search's range, the activation-patching profile and the refusal direction's
best layer, as one table (``Localisation`` rows), one plot and a statement computed from the
numbers of where they agree (``analyses.causal`` writes them; ``analyses.plots.plot_causal``
draws them).  Each row carries a ``kind`` (what it localises, for the code) beside its ``method``
(the label a reader sees), so the prose never parses a label."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from interp.direction import DirectionResult
from interp.export import LocatedRange
from interp.patching import DIRECTIONS, PatchedGeneration, PatchingResult
from interp.ranges import LayerRange

FORWARD, REVERSE = DIRECTIONS


@dataclass(frozen=True)
class GapOnset:
    """One model's entry of an existence-analysis JSON: the onset rule's suggestion."""

    model: str
    n_layers: int
    range: LayerRange | None
    onset: int | None
    plateau: int | None
    reason: str

    @classmethod
    def from_result(cls, result) -> "GapOnset":
        """The onset rule's suggestion of an ``interp.existence.ExistenceResult``."""
        onset = result.onset
        return cls(result.model, result.n_layers, onset.range, onset.onset, onset.plateau, onset.reason)


# --- the table ---------------------------------------------------------------------------------


KINDS = ("gap", "scaling", "resid_band", "attn_peak", "mlp_peak", "direction")


@dataclass
class Localisation:
    """One localisation of one model: a layer interval (``start``..``end``), a single layer
    (``point``), or neither when the method found nothing.  ``kind``: one of ``KINDS``;
    ``patch_direction``: for a residual band, which way it patched (``DIRECTIONS``)."""

    kind: str
    model: str
    method: str
    source: str
    start: int | None = None
    end: int | None = None
    point: int | None = None
    layers: list[int] = field(default_factory=list)
    value: float | None = None
    threshold: float | None = None
    detail: str = ""
    patch_direction: str | None = None

    @property
    def interval(self) -> tuple[int, int] | None:
        """What the agreement is judged on: the single layer if there is one, else the interval."""
        if self.point is not None:
            return self.point, self.point
        if self.start is not None:
            return self.start, self.end
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def _span(layers: list[int]) -> tuple[int | None, int | None]:
    return (min(layers), max(layers)) if layers else (None, None)


def _runs(layers: list[int]) -> str:
    """``[3,4,5,9]`` -> ``"3-5, 9"``."""
    parts, run = [], []
    for layer in sorted(layers):
        if run and layer != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(layer)
    if run:
        parts.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def localisations(spec: str, gap: GapOnset | None, located: LocatedRange | None, patching: PatchingResult | None,
                  direction: DirectionResult | None, *, threshold: float = 0.5, located_current: bool | None = None
                  ) -> list[Localisation]:
    """The rows of the side-by-side table for one model."""
    rows = []
    if gap is not None:
        if gap.range is not None:
            rows.append(Localisation("gap", spec, "gap onset-plateau", "existence (angle gap)", gap.range.start, gap.range.end,
                                     layers=gap.range.layers, detail=f"onset {gap.onset}, plateau {gap.plateau}"))
        else:
            rows.append(Localisation("gap", spec, "gap onset-plateau", "existence (angle gap)",
                                     detail=gap.reason or "no range"))
    if located is not None:
        stale = "" if located_current in (None, True) else "; made for other weights (stale)"
        initial = LayerRange(**located.record["initial_range"])
        rows.append(Localisation("scaling", spec, "scaling search", "located.json", located.range.start, located.range.end,
                                 layers=located.range.layers,
                                 detail=f"alpha {located.alpha:g}, initial {initial}{stale}"))
    if patching is not None:
        for direction_name, label in ((FORWARD, "harmful into benign"), (REVERSE, "benign into harmful")):
            if direction_name not in patching.directions or "resid_post" not in patching.sites:
                continue
            band = patching.band("resid_post", direction_name, threshold)
            start, end = _span(band)
            profile = patching.profile("resid_post", direction_name)
            rows.append(Localisation(
                "resid_band", spec, f"patching resid >= {threshold:.0%} ({label})", "activation patching", start, end,
                layers=band, value=float(np.nanmax(profile)) if not np.all(np.isnan(profile)) else None,
                threshold=threshold,
                detail=(f"layers {_runs(band)}" if band else f"no layer reaches {threshold:.0%}")
                + f"; {patching.n_used}/{len(patching.pair_ids)} pairs with gap >= {patching.min_gap:g}",
                patch_direction=direction_name))
        for site, kind, label in (("attn_out", "attn_peak", "attention output"), ("mlp_out", "mlp_peak", "MLP output")):
            if site not in patching.sites or FORWARD not in patching.directions:
                continue
            top = patching.top_layers(site, FORWARD)
            profile = patching.profile(site, FORWARD)
            peak = None if not top else patching.layers[int(np.nanargmax(profile))]
            start, end = _span(top)
            rows.append(Localisation(
                kind, spec, f"patching {label} peak", "activation patching", start, end, point=peak, layers=top,
                value=float(np.nanmax(profile)) if not np.all(np.isnan(profile)) else None,
                detail=(f"peak layer {peak} ({np.nanmax(profile):.0%} of the gap); within half of it: {_runs(top)}"
                        if top else "no single layer recovers 5% of the gap")))
    if direction is not None:
        layer = direction.layer
        sep = direction.separation.set_index("layer")
        rates = ""
        if direction.rates is not None:
            frame = direction.rates.to_frame().set_index(["condition", "side"])["rate"]
            rates = (f"; refusal of test harmful {frame['clean', 'harmful']:.0%} -> "
                     f"{frame['ablation', 'harmful']:.0%} ablated, of test benign {frame['clean', 'benign']:.0%} -> "
                     f"{frame['addition', 'benign']:.0%} added")
        rows.append(Localisation("direction", spec, "refusal direction best layer", "difference of means (validation choice)",
                                 layer, layer, point=layer, layers=[layer], value=float(sep.loc[layer, "auroc"]),
                                 detail=f"test AUROC {sep.loc[layer, 'auroc']:.2f}{rates}"))
    return rows


def table(rows: list[Localisation]) -> pd.DataFrame:
    """The rows as a frame (layer columns as nullable integers, ``layers`` as runs: "16-29")."""
    frame = pd.DataFrame([r.to_dict() for r in rows]).drop(columns=["kind", "patch_direction"])
    for column in ("start", "end", "point"):
        frame[column] = frame[column].astype("Int64")
    frame["layers"] = [_runs(r.layers) for r in rows]
    return frame


# --- the statement -----------------------------------------------------------------------------


def fmt_interval(interval: tuple[int, int]) -> str:
    return f"layer {interval[0]}" if interval[0] == interval[1] else f"[{interval[0]},{interval[1]}]"


def relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """How interval ``a`` (a single layer when its bounds are equal) sits relative to interval
    ``b`` (inclusive bounds), in words."""
    single = a[0] == a[1]
    if a == b:
        return "coincides with"
    if b[0] <= a[0] and a[1] <= b[1]:
        return "lies inside"
    if a[0] <= b[0] and b[1] <= a[1]:
        return "contains"
    if a[1] < b[0]:
        gap = b[0] - a[1]
        return f"{'lies' if single else 'ends'} {gap} layer{'s' if gap > 1 else ''} before"
    if a[0] > b[1]:
        gap = a[0] - b[1]
        return f"{'lies' if single else 'starts'} {gap} layer{'s' if gap > 1 else ''} after"
    return f"overlaps (on {fmt_interval((max(a[0], b[0]), min(a[1], b[1])))})"


SHORT_NAMES = {
    "gap": "the gap range",
    "scaling": "the scaling-located range",
    "attn_peak": "the attention-output peak",
    "mlp_peak": "the MLP-output peak",
    "direction": "the direction's layer",
}
BAND_NAMES = {FORWARD: "the residual band (harmful into benign)", REVERSE: "the residual band (benign into harmful)"}


def short_name(row: Localisation) -> str:
    if row.kind == "resid_band":
        return BAND_NAMES[row.patch_direction]
    return SHORT_NAMES[row.kind]


def _common(intervals: list[tuple[int, int]]) -> tuple[int, int] | None:
    lo, hi = max(i[0] for i in intervals), min(i[1] for i in intervals)
    return (lo, hi) if lo <= hi else None


def agreement_statement(rows: list[Localisation]) -> str:
    """A paragraph, for one model, of where its localisations agree (every clause computed)."""
    if not rows:
        return ""
    spec = rows[0].model
    by = {r.kind: r for r in rows if r.kind != "resid_band"}
    found = [r for r in rows if r.interval is not None]
    gap, located, direction = by.get("gap"), by.get("scaling"), by.get("direction")
    bands = {r.patch_direction: r for r in rows if r.kind == "resid_band"}
    resid, reverse = bands.get(FORWARD), bands.get(REVERSE)
    refs = [(name, r.interval) for name, r in (("the gap range", gap), ("the scaling-located range", located))
            if r is not None and r.interval is not None]
    sentences = []
    if gap is not None and gap.interval is None:
        sentences.append(f"On {spec} the existence analysis found no gap onset ({gap.detail}).")
    elif gap is not None:
        sentences.append(f"On {spec} the angle gap rises over {fmt_interval(gap.interval)} ({gap.detail}).")
    if located is not None and gap is not None and gap.interval is not None:
        sentences.append(f"The scaling-located range {fmt_interval(located.interval)} "
                         f"{relation(located.interval, gap.interval)} the gap range.")
    elif located is not None:
        sentences.append(f"The scaling search located {fmt_interval(located.interval)}.")

    def against(interval) -> str:
        return " and ".join(f"{relation(interval, ref)} {name}" for name, ref in refs)

    for row, what in ((resid, "the harmful run's residual into the benign run"),
                      (reverse, "the benign run's residual into the harmful run")):
        if row is None:
            continue
        threshold = f"{row.threshold:.0%}"
        if row.interval is None:
            sentences.append(f"Writing {what} at the last prompt position moves the refusal log-odds {threshold} of "
                             f"the way across the clean gap at no layer.")
        else:
            where = against(row.interval)
            sentences.append(f"Writing {what} at the last prompt position moves the refusal log-odds at least "
                             f"{threshold} of the way across the clean gap at layers {_runs(row.layers)}"
                             + (f"; that band {where}." if where else "."))
    for kind, what in (("attn_peak", "attention output"), ("mlp_peak", "MLP output")):
        row = by.get(kind)
        if row is None:
            continue
        if row.point is None:
            sentences.append(f"No single layer's {what} moves 5% of the gap.")
        else:
            where = against(row.interval)
            sentences.append(f"Of single-layer {what} patches, layer {row.point}'s moves the most ({row.value:.0%} of "
                             f"the gap)" + (f"; it {where}." if where else "."))
    if direction is not None:
        clauses = [against(direction.interval)] if refs else []
        if resid is not None and resid.interval is not None:
            clauses.append(("lies inside" if direction.point in resid.layers else "lies outside")
                           + " the residual band (harmful into benign)")
        sentences.append(f"The refusal direction's best layer, {direction.point} (chosen on validation pairs)"
                         + (", " + ", and ".join(clauses) if clauses else "") + ".")
    intervals = [(short_name(r), r.interval) for r in found]
    if len(intervals) >= 2:
        common = _common([i for _, i in intervals])
        if common is not None:
            sentences.append(f"All {len(intervals)} localisations ({', '.join(n for n, _ in intervals)}) "
                             f"share {fmt_interval(common)}.")
        else:
            best = None
            for i, (name_a, a) in enumerate(intervals):
                for name_b, b in intervals[i + 1:]:
                    both = _common([a, b])
                    if both is not None and (best is None or both[1] - both[0] > best[2][1] - best[2][0]):
                        best = (name_a, name_b, both)
            counts = {layer: sum(i[0] <= layer <= i[1] for _, i in intervals) for layer in
                      range(min(i[0] for _, i in intervals), max(i[1] for _, i in intervals) + 1)}
            most = max(counts.values())
            layers = [layer for layer, c in counts.items() if c == most]
            meet = ", ".join(name for name, i in intervals if i[0] <= layers[0] <= i[1])
            if len(layers) > 1:
                meet = f"at layer {layers[0]}: {meet}"
            sentences.append(f"No layer lies in all {len(intervals)} localisations; at most {most} of them meet, at "
                             f"layer{'s' if len(layers) > 1 else ''} {_runs(layers)} ({meet}"
                             + (f"; the widest pairwise overlap is {best[0]} with {best[1]}, "
                                f"on {fmt_interval(best[2])})." if best else ")."))
    return " ".join(sentences)


def generation_statement(generation: PatchedGeneration | None) -> str:
    """A sentence on the generation check of the residual patch (computed)."""
    if generation is None or FORWARD not in generation.directions:
        return ""
    n = len(generation.kept)
    if n == 0:
        return ("By generation, no screened pair had its harmful request refused and its benign request answered, "
                "so the residual patch was not judged by generation.")
    rates = [(layer, generation.rate(FORWARD, layer)) for layer in generation.layers]
    listed = ", ".join(f"{r.k}/{r.n} at layer {layer}" for layer, r in rates)
    half = [layer for layer, r in rates if r.rate >= 0.5]
    first = (f"; at least half from layer {half[0]} on" if half and all(r.rate >= 0.5 for layer, r in rates
                                                                        if layer >= half[0])
             else f"; at least half at layer{'s' if len(half) > 1 else ''} {_runs(half)}" if half
             else "; at no tested layer half")
    return (f"By generation, on the {n} pairs whose harmful request is refused and benign request answered, writing "
            f"the harmful residual into the benign prompt's last position during the prefill turns the benign answer "
            f"into a refusal in {listed}{first}.")
