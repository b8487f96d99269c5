"""The R_o landscape as a heatmap: start layer down, end layer across, one cell per range
``[i, j]`` (``interp.landscape``), with the bound searches' paths and the chosen range drawn on
it.  Ranges whose scaling moves R_o against the safety-layer direction (below the unscaled
model for α > 1) are marked with a dot.  Returns a ``Figure``; saving is the caller's
(``interp.io.atomic_savefig``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from interp.ranges import LayerRange

PATH_COLOURS = ("tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def search_path(result) -> list[LayerRange]:
    """The ranges a bound search measured, in order (upper sweep, then lower sweep), then its
    result, from a search result with ``upper`` and ``lower`` rows and ``range``
    (``interp.locate``'s ``BoundSearch``): the drawn line ends at the range the search chose,
    not at the last one it measured."""
    measured = [row.range for row in [*result.upper, *result.lower] if row.range is not None]
    return measured + [result.range] if measured[-1:] != [result.range] else measured


def landscape_grid(frame: pd.DataFrame, n_layers: int) -> np.ndarray:
    """``[start, end]`` R_o, NaN where not measured (and below the diagonal)."""
    grid = np.full((n_layers, n_layers), np.nan)
    grid[frame["start"].to_numpy(int), frame["end"].to_numpy(int)] = frame["R_o"].to_numpy(float)
    return grid


def _draw(ax, frame: pd.DataFrame, n_layers: int, paths, chosen, title: str):
    grid = landscape_grid(frame, n_layers)
    image = ax.imshow(grid, origin="upper", cmap="viridis", interpolation="nearest")
    below = frame[frame["below_unscaled"].astype(bool)]
    if len(below):
        ax.scatter(below["end"], below["start"], s=8, color="white", edgecolors="black", linewidths=0.3, marker="o",
                   label="below the unscaled model" if float(frame["alpha"].iloc[0]) > 1 else "above the unscaled model")
    for n, (label, ranges) in enumerate((paths or {}).items()):
        colour = PATH_COLOURS[n % len(PATH_COLOURS)]
        ax.plot([r.end for r in ranges], [r.start for r in ranges], color=colour, marker="o", markersize=3,
                linewidth=1.2, label=f"search from {label}")
        ax.scatter([ranges[-1].end], [ranges[-1].start], s=60, facecolors="none", edgecolors=colour, linewidths=1.5)
    for label, layer_range, marker in chosen or []:
        ax.scatter([layer_range.end], [layer_range.start], s=220, marker=marker, color="red", edgecolors="white",
                   zorder=5, label=f"{label} {layer_range}")
    ax.set_xlabel("end layer j")
    ax.set_ylabel("start layer i")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    return image


def plot_landscape(frame: pd.DataFrame, n_layers: int, *, paths: dict[str, Sequence[LayerRange]] | None = None,
                   chosen: list[tuple[str, LayerRange, str]] | None = None, title: str = "") -> Figure:
    """One landscape: R_o of ``[i, j]`` at row ``i``, column ``j``.  ``paths``: label -> the
    ranges a search measured (``search_path``), drawn as a line ending in a circle at its
    result; ``chosen``: ``(label, range, marker)`` to star, e.g. the global winner."""
    alpha = float(frame["alpha"].iloc[0])
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    unscaled = int(frame["unscaled_R_o"].iloc[0])
    head = f"R_o of every range x {alpha:g} on {int(frame['n_queries'].iloc[0])} queries (unscaled {unscaled})"
    image = _draw(ax, frame, n_layers, paths, chosen, f"{title}\n{head}" if title else head)
    fig.colorbar(image, ax=ax, label="R_o (refused queries)")
    return fig


def plot_landscapes(frames: list[pd.DataFrame], n_layers: int, *, chosen=None, title: str = "") -> Figure:
    """Several landscapes side by side (e.g. the α the std rule chose beside α = 1.2), one
    colour scale each."""
    fig = Figure(figsize=(6.5 * len(frames), 6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(frames)))
    for ax, frame, marks in zip(axes, frames, chosen or [None] * len(frames)):
        alpha = float(frame["alpha"].iloc[0])
        image = _draw(ax, frame, n_layers, None, marks,
                      f"alpha {alpha:g}: {int(frame['n_queries'].iloc[0])} queries, "
                      f"unscaled {int(frame['unscaled_R_o'].iloc[0])}")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig
