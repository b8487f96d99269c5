"""The localisations of the safety layers side by side: the existence analysis's gap onset and
plateau, the scaling search's range, the activation-patching profile and the refusal direction's
best layer, as one table (``Localisation`` rows), one plot and a statement computed from the
numbers of where they agree (``analyses.causal`` writes them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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


@dataclass
class Localisation:
    """One localisation of one model: a layer interval (``start``..``end``), a single layer
    (``point``), or neither when the method found nothing."""

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
            rows.append(Localisation(spec, "gap onset-plateau", "existence (angle gap)", gap.range.start, gap.range.end,
                                     layers=gap.range.layers, detail=f"onset {gap.onset}, plateau {gap.plateau}"))
        else:
            rows.append(Localisation(spec, "gap onset-plateau", "existence (angle gap)",
                                     detail=gap.reason or "no range"))
    if located is not None:
        stale = "" if located_current in (None, True) else "; made for other weights (stale)"
        initial = LayerRange(**located.record["initial_range"])
        rows.append(Localisation(spec, "scaling search", "located.json", located.range.start, located.range.end,
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
                spec, f"patching resid >= {threshold:.0%} ({label})", "activation patching", start, end,
                layers=band, value=float(np.nanmax(profile)) if not np.all(np.isnan(profile)) else None,
                threshold=threshold,
                detail=(f"layers {_runs(band)}" if band else f"no layer reaches {threshold:.0%}")
                + f"; {patching.n_used}/{len(patching.pair_ids)} pairs with gap >= {patching.min_gap:g}"))
        for site, label in (("attn_out", "attention output"), ("mlp_out", "MLP output")):
            if site not in patching.sites or FORWARD not in patching.directions:
                continue
            top = patching.top_layers(site, FORWARD)
            profile = patching.profile(site, FORWARD)
            peak = None if not top else patching.layers[int(np.nanargmax(profile))]
            start, end = _span(top)
            rows.append(Localisation(
                spec, f"patching {label} peak", "activation patching", start, end, point=peak, layers=top,
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
        rows.append(Localisation(spec, "refusal direction best layer", "difference of means (validation choice)",
                                 layer, layer, point=layer, layers=[layer], value=float(sep.loc[layer, "auroc"]),
                                 detail=f"test AUROC {sep.loc[layer, 'auroc']:.2f}{rates}"))
    return rows


def table(rows: list[Localisation]) -> pd.DataFrame:
    """The rows as a frame (layer columns as nullable integers, ``layers`` as runs: "16-29")."""
    frame = pd.DataFrame([r.to_dict() for r in rows])
    for column in ("start", "end", "point"):
        frame[column] = frame[column].astype("Int64")
    frame["layers"] = [_runs(r.layers) for r in rows]
    return frame


# --- the statement -----------------------------------------------------------------------------


def _fmt(interval: tuple[int, int]) -> str:
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
    return f"overlaps (on {_fmt((max(a[0], b[0]), min(a[1], b[1])))})"


SHORT_NAMES = {
    "gap onset-plateau": "the gap range",
    "scaling search": "the scaling-located range",
    "patching attention output peak": "the attention-output peak",
    "patching MLP output peak": "the MLP-output peak",
    "refusal direction best layer": "the direction's layer",
}


def short_name(method: str) -> str:
    if method.startswith("patching resid"):
        return "the residual band (" + method.split("(")[1]
    return SHORT_NAMES.get(method, method)


def _common(intervals: list[tuple[int, int]]) -> tuple[int, int] | None:
    lo, hi = max(i[0] for i in intervals), min(i[1] for i in intervals)
    return (lo, hi) if lo <= hi else None


def agreement_statement(rows: list[Localisation]) -> str:
    """A paragraph, for one model, of where its localisations agree (every clause computed)."""
    if not rows:
        return ""
    spec = rows[0].model
    by = {r.method: r for r in rows}
    found = [r for r in rows if r.interval is not None]
    gap = next((r for r in rows if r.method == "gap onset-plateau"), None)
    located = next((r for r in rows if r.method == "scaling search"), None)
    resid = next((r for r in rows if r.method.startswith("patching resid") and "(harmful into" in r.method), None)
    reverse = next((r for r in rows if r.method.startswith("patching resid") and "(benign into" in r.method), None)
    direction = by.get("refusal direction best layer")
    refs = [(name, r.interval) for name, r in (("the gap range", gap), ("the scaling-located range", located))
            if r is not None and r.interval is not None]
    sentences = []
    if gap is not None and gap.interval is None:
        sentences.append(f"On {spec} the existence analysis found no gap onset ({gap.detail}).")
    elif gap is not None:
        sentences.append(f"On {spec} the angle gap rises over {_fmt(gap.interval)} ({gap.detail}).")
    if located is not None and gap is not None and gap.interval is not None:
        sentences.append(f"The scaling-located range {_fmt(located.interval)} "
                         f"{relation(located.interval, gap.interval)} the gap range.")
    elif located is not None:
        sentences.append(f"The scaling search located {_fmt(located.interval)}.")

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
    for method, what in (("patching attention output peak", "attention output"),
                         ("patching MLP output peak", "MLP output")):
        row = by.get(method)
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
    intervals = [(r.method, r.interval) for r in found]
    if len(intervals) >= 2:
        common = _common([i for _, i in intervals])
        if common is not None:
            sentences.append(f"All {len(intervals)} localisations ({', '.join(short_name(n) for n, _ in intervals)}) "
                             f"share {_fmt(common)}.")
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
            meet = ", ".join(short_name(name) for name, i in intervals if i[0] <= layers[0] <= i[1])
            if len(layers) > 1:
                meet = f"at layer {layers[0]}: {meet}"
            sentences.append(f"No layer lies in all {len(intervals)} localisations; at most {most} of them meet, at "
                             f"layer{'s' if len(layers) > 1 else ''} {_runs(layers)} ({meet}"
                             + (f"; the widest pairwise overlap is {short_name(best[0])} with {short_name(best[1])}, "
                                f"on {_fmt(best[2])})." if best else ")."))
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


# --- the plot ----------------------------------------------------------------------------------


def plot_causal(models: list[dict], threshold: float = 0.5) -> Figure:
    """Per model: the patching profiles (fraction of the refusal gap, per layer and site) with
    the gap range, the scaling-located range and the direction's best layer marked; beside it
    the direction's test AUROC per layer."""
    fig = Figure(figsize=(13, 3.8 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False, width_ratios=[2, 1])
    styles = {"resid_post": "tab:blue", "attn_out": "tab:orange", "mlp_out": "tab:green"}
    for (ax, ax_dir), entry in zip(axes, models):
        spec, patching, direction, rows = entry["spec"], entry["patching"], entry["direction"], entry["rows"]
        for row in rows:
            if row.method == "gap onset-plateau" and row.interval:
                ax.axvspan(row.start - 0.5, row.end + 0.5, color="grey", alpha=0.15,
                           label=f"gap range {_fmt(row.interval)}")
            if row.method == "scaling search":
                ax.axvspan(row.start - 0.5, row.end + 0.5, color="tab:red", alpha=0.15,
                           label=f"scaling-located {_fmt(row.interval)}")
        if patching is not None:
            for site in patching.sites:
                for direction_name, style in ((FORWARD, "-"), (REVERSE, "--")):
                    if direction_name in patching.directions:
                        ax.plot(patching.layers, patching.profile(site, direction_name), style,
                                color=styles.get(site, None), marker="o" if style == "-" else None, markersize=3,
                                label=f"{site}, {direction_name}")
        ax.axhline(threshold, color="black", linewidth=0.6, linestyle=":")
        ax.axhline(0, color="grey", linewidth=0.5)
        if direction is not None:
            ax.axvline(direction.layer, color="tab:purple", linewidth=1.5, label=f"direction's layer {direction.layer}")
            sep = direction.separation
            ax_dir.plot(sep["layer"], sep["auroc"], color="tab:purple", marker="o", markersize=3, label="test AUROC")
            ax_dir.axvline(direction.layer, color="tab:purple", linewidth=1.5)
            ax_dir.set_ylim(0.4, 1.02)
            ax_dir.axhline(0.5, color="grey", linewidth=0.5)
            sel = direction.selection.table
            twin = ax_dir.twinx()
            twin.plot(sel["layer"], sel["ablation_harmful"], color="tab:brown", linestyle="--", marker="x",
                      markersize=4, label="validation harmful log-odds, ablated")
            twin.axhline(direction.selection.clean_harmful, color="tab:brown", linewidth=0.6, linestyle=":")
            twin.set_ylabel("refusal log-odds (ablated)")
            handles = ax_dir.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax_dir.legend(handles=handles, fontsize=7, loc="center right")
        ax_dir.set_title(f"{spec}: refusal direction per layer")
        ax_dir.set_xlabel("layer")
        ax_dir.set_ylabel("AUROC harmful vs benign (test)")
        ax.set_title(f"{spec}: last-position patching, mean fraction of the refusal gap moved")
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of clean gap")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    return fig
