"""Every figure of the toolkit's results (matplotlib; each function returns a ``Figure``, saving is
the caller's: ``interp.io.atomic_savefig``).  The figures use the object-oriented API, never
``pyplot``'s global state, so they are safe in scripts, tests and notebooks alike.

Existence: ``plot_similarity``, ``plot_gap``, ``plot_probe``, ``plot_gap_comparison``; location:
``plot_sweeps``; protection: ``plot_protection``, ``plot_dose``, ``plot_audit``; causal
localisation: ``plot_causal``; layer circuits: ``plot_attention_heatmap`` (the static fallback of
the circuitsvis views) and ``plot_token_scores``."""

from __future__ import annotations

from jaxtyping import Float
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from analyses.localisation import FORWARD, REVERSE, fmt_interval
from interp.attention import token_label


def _subplots(*args, **kwargs):
    fig = Figure(figsize=kwargs.pop("figsize", (7, 4)), layout="constrained")
    return fig, fig.subplots(*args, **kwargs)


def plot_similarity(results):
    """Per model: mean ± sd cosine of N-N, M-M and N-M pairs per layer."""
    fig, axes = _subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False, sharey=True)
    for ax, result in zip(axes[0], results):
        frame = result.layers
        for kind, label in (("nn", "N-N"), ("mm", "M-M"), ("nm", "N-M")):
            mean, std = frame[f"{kind}_mean"], frame[f"{kind}_std"]
            ax.plot(frame["layer"], mean, label=label)
            ax.fill_between(frame["layer"], mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{result.model} ({result.template}): cosine, mean +- sd over all pairs")
        ax.set_xlabel("layer")
        ax.legend()
    axes[0][0].set_ylabel("cosine similarity")
    return fig


def plot_gap(results, centred: bool = False, title: str | None = None):
    """Each model's angle gap per layer with its 95% bootstrap band; dotted: suggested range."""
    fig, ax = _subplots(figsize=(7, 4))
    suffix = "_centred" if centred else ""
    for result in results:
        frame, definition = result.layers, result.gap_definition
        column = f"gap_{definition}{suffix}"
        line, = ax.plot(frame["layer"], frame[column], label=result.model)
        ax.fill_between(frame["layer"], frame[f"{column}_lo"], frame[f"{column}_hi"], color=line.get_color(), alpha=0.2)
        suggested = result.onset.range
        if suggested is not None and not centred:
            for layer in (suggested.start, suggested.end):
                ax.axvline(layer, color=line.get_color(), linestyle=":")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("angle(N,M) - angle(N,N') [deg]")
    kind = "mean-centred" if centred else "raw"
    ax.set_title(title or f"angle gap ({results[0].gap_definition} definition, {kind}), 95% bootstrap band")
    ax.legend()
    return fig


def plot_probe(results):
    """Held-out accuracy and AUROC of the logistic probe and the mean-difference direction."""
    fig, axes = _subplots(1, 2, figsize=(12, 4), sharey=True)
    for result in results:
        frame = result.layers
        for ax, metric in zip(axes, ("acc", "auroc")):
            line, = ax.plot(frame["layer"], frame[f"probe_{metric}"], label=f"{result.model} logistic")
            ax.plot(frame["layer"], frame[f"dim_{metric}"], linestyle="--", color=line.get_color(),
                    label=f"{result.model} mean difference")
    for ax, metric in zip(axes, ("held-out accuracy", "held-out AUROC")):
        ax.set_title(f"normal vs malicious: {metric}")
        ax.set_xlabel("layer")
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.legend()
    return fig


def plot_gap_comparison(comparison, unpaired=None):
    """The paired gaps of two models (raw and centred) and their difference with its paired
    bootstrap band; shaded: where the difference's interval is above zero."""
    table = comparison.table
    fig, axes = _subplots(1, 2, figsize=(12, 4))
    for ax, suffix, kind in ((axes[0], "", "raw"), (axes[1], "_centred", "mean-centred")):
        column = f"gap_{comparison.definition}{suffix}_diff"
        ax.plot(table["layer"], table[column], color="tab:red", label=f"{comparison.a} - {comparison.b}")
        ax.fill_between(table["layer"], table[f"{column}_lo"], table[f"{column}_hi"], color="tab:red", alpha=0.2)
        band = comparison.bands[f"gap_{comparison.definition}{suffix}"]["difference_above_zero"]
        if band:
            ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="tab:green", alpha=0.1, label=f"band {band}")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("gap difference [deg]")
        ax.set_title(f"paired prompts, {kind} gap: aligned minus base (95% paired bootstrap)")
        ax.legend(fontsize=8)
    return fig


def plot_sweeps(result, title: str, measure_label: str = "R_o"):
    """R_o against the upper and the lower bound of the scaled range; star: each sweep's winner."""
    fig, axes = _subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rows, bound, label in (
        (axes[0], result.upper, "end", f"upper bound (start fixed at {result.initial.start})"),
        (axes[1], result.lower, "start", f"lower bound (end fixed at {result.upper_end})"),
    ):
        xs = [getattr(r.range, bound) for r in rows]
        measured = [(x, r.r_o) for x, r in zip(xs, rows) if r.r_o is not None]
        if measured:
            ax.plot(*zip(*measured), marker="o", label=measure_label)
        estimated = [(x, r.estimate) for x, r in zip(xs, rows) if r.estimate is not None]
        if estimated:
            ax.plot(*zip(*estimated), marker="x", linestyle="--", label="first-step estimate / bound")
        for x, r in zip(xs, rows):
            if r.winner:
                value = r.r_o if r.r_o is not None else r.estimate
                ax.scatter([x], [value], s=200, marker="*", color="red", zorder=5, label=f"winner {r.range}")
        ax.axhline(result.baseline, color="grey", linestyle=":", label=f"baseline {result.baseline:.4g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"{bound} layer of the scaled range")
        ax.set_title(label)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("R_o (refused over-rejection queries)")
    fig.suptitle(title)
    return fig


MODE_COLOURS = {"full": "tab:red", "sppft": "tab:blue", "ablation": "tab:grey", "critical": "tab:purple",
                "sppft@full_lr": "tab:cyan", "full@sppft_lr": "tab:orange"}


def plot_protection(final, title: str = ""):
    """Final R_h per data set and mode (bars: mean over seeds; whiskers: 95% interval over seeds
    and requests), one panel per harmful set.  ``final``: ``finetune.study.summarise``'s first table."""
    sets = list(dict.fromkeys(final["set"]))
    datas = list(dict.fromkeys(final["data"]))
    modes = list(dict.fromkeys(final["mode"]))
    fig, axes = _subplots(1, len(sets), figsize=(4.5 * len(sets), 3.8), squeeze=False, sharey=True)
    width = 0.8 / len(modes)
    for ax, name in zip(axes[0], sets):
        for k, mode in enumerate(modes):
            rows = [final[(final["set"] == name) & (final["data"] == d) & (final["mode"] == mode)] for d in datas]
            xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(datas))]
            means = [100 * r["R_h"].iloc[0] if len(r) else float("nan") for r in rows]
            errs = [[100 * (r["R_h"].iloc[0] - r["lo"].iloc[0]) if len(r) else 0 for r in rows],
                    [100 * (r["hi"].iloc[0] - r["R_h"].iloc[0]) if len(r) else 0 for r in rows]]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=mode, color=MODE_COLOURS.get(mode))
        ax.set_xticks(range(len(datas)), datas)
        ax.set_title(name)
    axes[0][0].set_ylabel("R_h: harmful requests answered (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_dose(dose, title: str = ""):
    """R_h against fine-tuning steps, one panel per data set (pooled over the harmful sets'
    dose subsets: the mean of the per-set means), one line per mode with its 95% band."""
    datas = list(dict.fromkeys(dose["data"]))
    fig, axes = _subplots(1, len(datas), figsize=(5.5 * len(datas), 3.8), squeeze=False, sharey=True)
    for ax, data_name in zip(axes[0], datas):
        sub = dose[dose["data"] == data_name]
        for mode in dict.fromkeys(sub["mode"]):
            curve = sub[sub["mode"] == mode].groupby("step")[["R_h", "lo", "hi"]].mean().reset_index()
            colour = MODE_COLOURS.get(mode)
            ax.plot(curve["step"], 100 * curve["R_h"], marker="o", label=mode, color=colour)
            ax.fill_between(curve["step"], 100 * curve["lo"], 100 * curve["hi"], alpha=0.15, color=colour)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(data_name)
    axes[0][0].set_ylabel("R_h (%), mean of the harmful sets")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_audit(audit, title: str = ""):
    """The paired angle gap per layer after fine-tuning, one line per data set and mode."""
    fig, ax = _subplots(figsize=(7, 4))
    gap_columns = [c for c in audit.columns if c.startswith("gap_")]
    layers = [int(c.split("_")[1]) for c in gap_columns]
    for row in audit.to_dict("records"):
        style = "-" if row["mode"] != "before" else "--"
        ax.plot(layers, [row[c] for c in gap_columns], style, color=MODE_COLOURS.get(row["mode"], "black"),
                label=f"{row['data']} / {row['mode']} (R_o {row['R_o']:.0f}/{row['n']})")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("paired gap [deg]")
    ax.legend(fontsize=7)
    ax.set_title(title or "the safety layers' signature after fine-tuning")
    return fig


def plot_attention_heatmap(
    normal: Float[Tensor, "layer key_pos"],
    malicious: Float[Tensor, "layer key_pos"],
    normal_tokens: list[str],
    malicious_tokens: list[str],
    titles: tuple[str, str] = ("normal query", "malicious query"),
    cmap: str = "Reds",
):
    """Two heatmaps side by side: layers down (0 at the top), tokens across."""
    for scores, tokens, name in ((normal, normal_tokens, "normal"), (malicious, malicious_tokens, "malicious")):
        if scores.ndim != 2 or scores.shape[1] != len(tokens):
            raise ValueError(f"{name}: scores of shape {tuple(scores.shape)} do not match {len(tokens)} tokens")
    widths = [max(3, len(normal_tokens)), max(3, len(malicious_tokens))]
    n_layers = normal.shape[0]
    fig = Figure(figsize=(2 + 0.35 * sum(widths), 1.5 + 0.18 * n_layers), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True, width_ratios=widths)
    for ax, scores, tokens, title in zip(axes, (normal, malicious), (normal_tokens, malicious_tokens), titles):
        values = scores.float().cpu().numpy()
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(tokens)), [token_label(t) for t in tokens], rotation=90, fontsize=8)
        ax.set_title(title)
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention from last position (min–max per layer)")
    return fig


def plot_token_scores(tokens: list[str], scores: Float[Tensor, " pos"], title: str = "", ax=None):
    """A static bar chart of per-token scores (the fallback where circuitsvis cannot run)."""
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    fig = None
    if ax is None:
        fig = Figure(figsize=(1 + 0.3 * len(tokens), 2.5), layout="constrained")
        ax = fig.subplots()
    values = scores.float().cpu().numpy()
    ax.bar(range(len(tokens)), values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
    ax.set_xticks(range(len(tokens)), [token_label(t) for t in tokens], rotation=90, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(title)
    return fig if fig is not None else ax.figure


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
            if row.kind == "gap" and row.interval:
                ax.axvspan(row.start - 0.5, row.end + 0.5, color="grey", alpha=0.15,
                           label=f"gap range {fmt_interval(row.interval)}")
            if row.kind == "scaling":
                ax.axvspan(row.start - 0.5, row.end + 0.5, color="tab:red", alpha=0.15,
                           label=f"scaling-located {fmt_interval(row.interval)}")
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
