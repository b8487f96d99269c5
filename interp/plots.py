"""Plots of the toolkit's results (matplotlib; each function returns a ``Figure``, saving is the
caller's: ``interp.io.atomic_savefig``).  The figures use the object-oriented API, never
``pyplot``'s global state, so they are safe in scripts, tests and notebooks alike."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


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
