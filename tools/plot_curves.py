"""Learning curves of several runs in one PNG, one panel per metric (the DFT paper's Figure 1).

Reads Lightning ``CSVLogger`` files (``metrics.csv``) and W&B offline runs (``wandb/offline-run-*``:
the ``.wandb`` file is read directly, see ``instruments_common``), and draws each chosen metric against
the optimizer step, every run in its own colour::

    python tools/plot_curves.py DFT=runs/demo_dft SFT=runs/demo_sft --metric 'eval/*/avg@*' --metric train/nll \\
        --out runs/curves.png

A run is ``[LABEL=]PATH``: a ``metrics.csv``, a ``.wandb`` file or a W&B run directory, or any directory
(searched: its ``metrics.csv`` files, or its W&B runs when it has none; ``--source`` picks one kind).
Several logs under one path become several runs, labelled by their folders. ``--metric`` takes names
or shell-style patterns; each metric found becomes a panel (``eval/*/avg@16``: one panel per benchmark).
Default: every ``eval/*/avg@*`` metric and ``train/nll``. ``--smooth 0.9`` draws an exponential moving
average over each series (the raw points stay, faint).

Not handled here: online W&B runs (no network; export them to CSV first), a wall-clock or token x axis.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instruments_common import Series, ToolError, find_logs, read_metrics, run_main, split_label  # noqa: E402

from dft_lightning.plotting import matching_metrics, plot_runs, smoothed  # noqa: E402, F401  (smoothed: part of this tool's API)

DEFAULT_METRICS = ("eval/*/avg@*", "train/nll")


def load_runs(specs: Sequence[str], source: str = "auto") -> dict[str, Series]:
    """``{label: series}`` for every log under each ``[LABEL=]PATH``."""
    runs: dict[str, Series] = {}
    for spec in specs:
        label, path = split_label(spec)
        logs = find_logs(path, source)
        if not logs:
            only = f" ({source} only)" if source != "auto" else ""
            raise ToolError(f"{path}: no metrics.csv or W&B run found{only}")
        for file, kind in logs:
            name = label
            if len(logs) > 1:  # several logs under one path: tell them apart by their folder
                rel = file.parent.relative_to(path) if Path(path).is_dir() else file.parent
                rel = rel if str(rel) == "." or kind == "csv" else rel.name
                name = f"{label}/{rel}" if str(rel) != "." else label
            if name in runs:
                raise ToolError(f"two runs are labelled {name!r}; give them labels (LABEL=PATH)")
            runs[name] = read_metrics(file, kind)
    return runs


def select_metrics(runs: dict[str, Series], patterns: Sequence[str]) -> list[str]:
    """Metric names matching ``patterns`` (in pattern order, then sorted), present in at least one run."""
    chosen = matching_metrics(runs, patterns)
    if not chosen:
        available = sorted({key for series in runs.values() for key in series})
        shown = ", ".join(available[:30]) + (" ..." if len(available) > 30 else "")
        raise ToolError(f"no metric matches {list(patterns)}; the runs have: {shown or 'nothing'}")
    return chosen


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]PATH", help="metrics.csv, W&B run, or a folder of them")
    parser.add_argument("--metric", action="append", default=None, help=f"name or pattern (default: {DEFAULT_METRICS})")
    parser.add_argument("--source", choices=("auto", "csv", "wandb"), default="auto", help="which logs to read")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (0: none)")
    parser.add_argument("--columns", type=int, default=3, help="panels per row")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="runs/curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    runs = load_runs(args.runs, args.source)
    metrics = select_metrics(runs, args.metric or DEFAULT_METRICS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plot_runs(runs, metrics, out, smooth=args.smooth, columns=args.columns, title=args.title)
    print(f"wrote {out}: {len(metrics)} panels ({', '.join(metrics)}), {len(runs)} runs ({', '.join(runs)})")
    return fig, axes


if __name__ == "__main__":
    run_main(main)
