"""The protection profile's figure: R_h after the attack against the frozen window's position,
with the located window (and the R_o landscape's winner, where it differs) marked and the
controls drawn as horizontal bands (mean and 95% crossed-bootstrap interval over seeds and
requests)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from finetune.protection import PRIMARY  # noqa: E402
from interp.ranges import LayerRange  # noqa: E402
from interp.stats import seeds_interval  # noqa: E402


def plot_profile(profile: pd.DataFrame, bands: dict, located: LayerRange, landscape: LayerRange | None = None,
                 title: str = "") -> plt.Figure:
    """``profile``: ``analyses.protection.profile_table``; ``bands``: label -> run records (the
    primary outcome's flags in ``record.final``)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    centre = (profile["start"] + profile["end"]) / 2
    ax.errorbar(centre, 100 * profile[PRIMARY], yerr=[100 * (profile[PRIMARY] - profile["lo"]),
                                                       100 * (profile["hi"] - profile[PRIMARY])],
                fmt="o-", color="black", capsize=2, label="window frozen")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (label, records) in zip(colours, bands.items()):
        if not records:
            continue
        stat = seeds_interval([r.final[PRIMARY] for r in records])
        ax.axhspan(100 * stat["lo"], 100 * stat["hi"], color=colour, alpha=0.15)
        ax.axhline(100 * stat["mean"], color=colour, lw=1.2, label=f"{label} ({stat['n_seeds']} seeds)")
    here = profile[profile["located"]]
    ax.plot((here["start"] + here["end"]) / 2, 100 * here[PRIMARY], "*", color="tab:red", ms=16, zorder=5,
            label=f"located {located}")
    if landscape is not None and landscape != located:
        ax.axvline((landscape.start + landscape.end) / 2, color="tab:purple", ls="--", lw=1,
                   label=f"landscape winner {landscape}")
    ax.set_xlabel("frozen window's centre layer")
    ax.set_ylabel("R_h after the attack, AdvBench test (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
