"""Pictures and logged numbers shared by the instruments (``tools/``) and the demo's report.

- ``pyplot()``: matplotlib on the Agg backend (no display), a one-line error when it is missing;
- ``read_csv_metrics``: ``{metric: [(step, value), ...]}`` from a Lightning ``metrics.csv``;
- ``plot_runs``: learning curves, one panel per metric, one line per run (the DFT paper's Figure 1);
- ``plot_probabilities``: overlaid token-probability histograms, linear and log x (its Figure 2).

Not handled here: interactive figures; the caller closes what it no longer needs.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dft_lightning.errors import UserError

Series = dict[str, list[tuple[float, float]]]
LOG_FLOOR = 1e-8  # the log-x panel's lowest edge; smaller probabilities are drawn in its first bin


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed); a one-line error when it is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("matplotlib is not installed: pip install -e '.[demo]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def number(text: Any) -> float | None:
    """A finite float from a CSV cell, else ``None`` (empty, not a number, inf or NaN)."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_csv_metrics(path: str | Path) -> Series:
    """``{metric: [(step, value), ...]}`` from a Lightning ``metrics.csv`` (empty cells skipped)."""
    path = Path(path)
    series: Series = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise UserError(f"{path}: not a Lightning metrics.csv (no 'step' column)")
        for row in reader:
            step = number(row.get("step"))
            if step is None:
                continue
            for key, text in row.items():
                if key in ("step", "epoch") or key is None:
                    continue
                value = number(text)
                if value is not None:
                    series.setdefault(key, []).append((step, value))
    return series


def matching_metrics(runs: dict[str, Series], patterns: Sequence[str]) -> list[str]:
    """Metric names matching the glob ``patterns`` (in pattern order, then sorted), present in at least one run."""
    import fnmatch

    available = sorted({key for series in runs.values() for key in series})
    chosen: list[str] = []
    for pattern in patterns:
        for key in available:
            if fnmatch.fnmatchcase(key, pattern) and key not in chosen:
                chosen.append(key)
    return chosen


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (the first point is not pulled towards zero)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_runs(runs: dict[str, Series], metrics: Sequence[str], path: str | Path | None = None, smooth: float = 0.0,
              columns: int = 3, title: str | None = None):
    """One panel per metric, one line per run; returns ``(figure, axes)`` (one axis per panel), saved to ``path``."""
    plt = pyplot()
    columns = max(1, min(columns, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(metrics):]:
        ax.remove()
    axes = axes[: len(metrics)]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (label, series) in enumerate(runs.items()):
            points = sorted(series.get(metric, []))
            if not points:
                continue
            steps, values = [p[0] for p in points], [p[1] for p in points]
            colour = f"C{i % 10}"
            single = len(points) == 1
            if smooth > 0 and len(points) > 2:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
                ax.plot(steps, smoothed(values, smooth), color=colour, label=label, linewidth=1.8)
            else:
                ax.plot(steps, values, color=colour, label=label, linewidth=1.8, marker="o" if single or
                        len(points) <= 20 else None, markersize=3.5)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # the legend of all runs, whichever panels they appear in
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, y=1.04)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if rows == 1 else 0.96))
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig, axes


def plot_probabilities(results: dict[str, np.ndarray], path: str | Path | None = None, title: str | None = None):
    """Overlaid histograms of token probabilities (one colour per model, log-scale counts), over probability and
    over log probability (the unlikely tail); returns the figure, saved to ``path``."""
    plt = pyplot()
    fig, (lin, log) = plt.subplots(1, 2, figsize=(12, 4.5))
    lin_edges = np.linspace(0.0, 1.0, 51)
    log_edges = np.logspace(np.log10(LOG_FLOOR), 0.0, 65)
    for i, (label, probs) in enumerate(results.items()):
        colour = f"C{i % 10}"
        lin.hist(np.clip(probs, 0.0, 1.0), bins=lin_edges, histtype="step", linewidth=1.6, color=colour, label=label)
        log.hist(np.clip(probs, LOG_FLOOR, 1.0), bins=log_edges, histtype="step", linewidth=1.6, color=colour,
                 label=label)
    lin.set(xlabel="token probability", ylabel="tokens (log scale)", yscale="log", xlim=(0, 1),
            title="supervised-token probabilities")
    log.set(xlabel=f"token probability (log scale; below {LOG_FLOOR:g} in the first bin)", ylabel="tokens (log scale)",
            xscale="log", yscale="log", title="the unlikely tail")
    lin.legend(loc="upper center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
