"""The comparison plots: labelled points against stored bits per weight, log y (matplotlib).

matplotlib is an optional extra (`pip install "binllm[plot]"`); it is imported when a plot is
drawn, and its ImportError reaches the caller, which says that the plot was skipped.
Imports only `binllm.atomic` of binllm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write


@dataclass(frozen=True)
class Panel:
    """One axes of a frontier plot: labelled (x, y) points and horizontal reference lines."""

    title: str
    ylabel: str
    points: list[tuple[str, float, float]]
    hlines: list[tuple[str, float]] = field(default_factory=list)
    xlabel: str = "stored bits per weight"


def plot_panels(panels: list[Panel], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the panels (log y), one marker per point; PNG, atomically.

    Each label keeps one colour and marker in every panel and is named once in a legend on the
    right; the points are also numbered on the axes (n = position in the legend), so that
    close points stay readable. Raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for p in panels for label, _, _ in p.points))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols + 2.8, 4.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, x, y in panel.points:
            i = labels.index(label)
            ax.plot([x], [y], markers[i % len(markers)], color=colors[i % len(colors)],
                    label=f"{i + 1}  {label}", markersize=7)
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(5, 3),
                        fontsize=7)
        for label, y in panel.hlines:
            ax.axhline(y, color="gray", linestyle="--", linewidth=1)
            ax.annotate(label, (ax.get_xlim()[0], y), textcoords="offset points",
                        xytext=(2, 3), fontsize=7, color="gray")
        ax.set_yscale("log")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = sorted(handles, key=lambda lab: int(lab.split()[0]))
    fig.legend([handles[k] for k in order], order, loc="center right", fontsize=7,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_size_inches()[0], 1))
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return target


def plot_frontier(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """frontier.png: per dataset, perplexity against stored bits per weight, FP as a line."""
    fp = (results.get("fp") or {}).get("perplexity") or {}
    ok = [r for r in results["runs"] if r.get("status") == "ok"]
    panels = [Panel(f"{d}", "perplexity (log)",
                    [(r["label"], r["stored_bits"], r["perplexity"][d]["ppl"]) for r in ok
                     if d in r["perplexity"]],
                    [("FP", fp[d]["ppl"])] if d in fp else [])
              for d in results["protocol"]["eval"]]
    name = Path(results["protocol"]["model"]).name
    return plot_panels(panels, path, f"Quality per stored bit: {name}")
