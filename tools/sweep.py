"""Hyper-parameter sweeps from a base config: one config per point, resumable runs, a results table and plots.

The DFT paper's Figure 3 is two one-dimensional ablations, each for DFT and SFT: the learning rate
(2e-4, 1e-4, 5e-5, 1e-5) and the batch size (32 to 256). Each is one sweep here::

    python tools/sweep.py --config conf/paper/base_math.yaml --out runs/sweep_lr \\
        --axis model.lr=2e-4,1e-4,5e-5,1e-5 \\
        --axis model.objective.class_path=dft_lightning.objectives.DFT,dft_lightning.objectives.SFT \\
        --metric eval/mean/avg --mode max

Every point of the grid (the product of the ``--axis`` values) gets a folder ``<out>/<NN>-<values>/`` with
``point.yaml`` (the axis values and ``--set`` overrides, and ``trainer.default_root_dir`` set to the folder,
where the base config's loggers then write, as the project's configs do with ``${trainer.default_root_dir}``).
``--launch run`` (default) runs the points one after another (``python -m dft_lightning fit --config <base>...
--config point.yaml``, output in ``train.log``; ``--launcher 'torchrun --nproc_per_node=8'`` replaces
``python``); ``--launch print`` prints one launch line per unfinished point; ``--launch slurm`` writes
``<out>/sweep.sbatch``, a SLURM array over them (``--sbatch '--gres=gpu:8 --time=12:00:00'`` adds
``#SBATCH`` options). Printed lines and array tasks run ``tools/sweep.py --point <folder>``, which runs the
same command and writes the same markers.

A point that finished writes ``done.json`` (return code, seconds and a fingerprint of the base configs'
contents, ``point.yaml`` and the launcher); a rerun skips every point whose marker matches, reruns failed
points (``failed.json``, with the end of the log) and points whose inputs changed; ``--force`` reruns all.

Results (``results.md``, ``results.csv``, ``results.png``): per point, the chosen ``--metric`` from its
``metrics.csv`` (CSVLogger; ``--reduce last`` value, or the ``min`` / ``max`` over the run), the best
point by ``--mode`` marked; the plot has a line per axis (the metric against that axis, one line per
combination of the other axes) and, when exactly two axes cross, a heatmap. ``--collect`` only rebuilds
the results.

The flags can live in a file, ``python tools/sweep.py @conf/paper/figure3_lr.sweep`` (shell words, any number per
line, ``#`` comments; flags after it override its single-valued ones, e.g. ``--out``).

Not handled here: random or Bayesian search, parallel local runs (use the SLURM array), runs whose
loggers do not write under ``trainer.default_root_dir``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instruments_common import ToolError, find_logs, markdown_table, pyplot, read_csv_metrics, run_main  # noqa: E402

SWEEP_SCRIPT = Path(__file__).resolve()
POINT_FILE, CONFIG_FILE, DONE_FILE, FAILED_FILE, LOG_FILE = "point.json", "point.yaml", "done.json", "failed.json", \
    "train.log"


# -- the grid ------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """``"2e-4"`` -> 0.0002, ``"32"`` -> 32, ``"true"`` -> True, ``"null"`` -> None, anything else a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    return text


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ToolError(f"{what} {text!r}: expected KEY=VALUE with a dotted config key (e.g. model.lr=1e-4)")
    return key, value


def parse_axes(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["model.lr=1e-4,5e-5", ...]`` -> ``{"model.lr": [1e-4, 5e-5], ...}``."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        key, values = parse_assignment(spec, "--axis")
        parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
        if not parsed:
            raise ToolError(f"--axis {spec!r}: no values")
        if key in axes:
            raise ToolError(f"--axis {key} is given twice")
        if len(set(map(repr, parsed))) != len(parsed):
            raise ToolError(f"--axis {spec!r}: a value is repeated")
        axes[key] = parsed
    return axes


def short_key(key: str) -> str:
    """``model.lr`` -> ``lr``; ``model.objective.class_path`` -> ``objective``; ``data.init_args.batch_size`` ->
    ``batch_size``."""
    parts = [p for p in key.split(".") if p not in ("class_path", "init_args")]
    return parts[-1] if parts else key


def short_value(value: Any) -> str:
    """``dft_lightning.objectives.DFT`` -> ``DFT``; ``0.0002`` -> ``0.0002``."""
    if isinstance(value, str) and "." in value and re.fullmatch(r"[\w.]+", value) and not _is_number(value):
        return value.rsplit(".", 1)[1]
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"model.lr": 1}`` -> ``{"model": {"lr": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ToolError(f"config key {key} conflicts with another override")
        node[last] = value
    return out


@dataclass
class Point:
    """One point of the grid and its folder."""

    index: int
    values: dict[str, Any]  # axis key -> value
    folder: Path
    status: str = "pending"  # pending, done, failed, skipped (done before), ran (done now)
    metric: float | None = None
    seconds: float | None = None
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name


def grid(axes: dict[str, list[Any]], out: Path) -> list[Point]:
    points = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        values = dict(zip(axes, combo, strict=True))
        label = "-".join(f"{short_key(k)}={short_value(v)}" for k, v in values.items())
        folder = out / re.sub(r"[^\w.=+-]", "_", f"{index:02d}-{label}")
        points.append(Point(index, values, folder))
    return points


# -- one point -----------------------------------------------------------------------------------
def write_point(point: Point, configs: Sequence[Path], overrides: dict[str, Any], launcher: Sequence[str],
                cwd: Path) -> None:
    """``point.yaml`` (what the run gets on top of the base configs) and ``point.json`` (how to run it)."""
    point.folder.mkdir(parents=True, exist_ok=True)
    flat = {**overrides, **point.values, "trainer.default_root_dir": str(point.folder.resolve())}
    (point.folder / CONFIG_FILE).write_text(
        "# written by tools/sweep.py: merged over the base config(s) in point.json\n"
        + yaml.safe_dump(nested(flat), sort_keys=False))
    (point.folder / POINT_FILE).write_text(json.dumps({
        "configs": [str(c) for c in configs], "values": point.values, "overrides": overrides,
        "launcher": list(launcher), "cwd": str(cwd),
    }, indent=2) + "\n")


def fingerprint(folder: Path) -> str:
    """Hash of what decides a point's run: the base configs' contents, ``point.yaml`` and the launcher."""
    spec = json.loads((folder / POINT_FILE).read_text())
    digest = hashlib.sha256()
    for config in spec["configs"]:
        digest.update(Path(config).read_bytes() if Path(config).is_file() else config.encode())
    digest.update((folder / CONFIG_FILE).read_bytes())
    digest.update(json.dumps(spec["launcher"]).encode())
    return digest.hexdigest()


def is_done(folder: Path) -> bool:
    marker = folder / DONE_FILE
    if not marker.is_file() or not (folder / POINT_FILE).is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint(folder)
    except (json.JSONDecodeError, OSError):
        return False


def fit_command(folder: Path) -> list[str]:
    spec = json.loads((folder / POINT_FILE).read_text())
    launcher = spec["launcher"] or [sys.executable]
    configs = [arg for config in spec["configs"] for arg in ("--config", config)]
    return [*launcher, "-m", "dft_lightning", "fit", *configs, "--config", str(folder.resolve() / CONFIG_FILE)]


def _rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("SLURM_PROCID", "RANK"))


def run_point(folder: Path) -> bool:
    """Run one prepared point (its output in ``train.log``), write ``done.json`` or ``failed.json``."""
    folder = Path(folder)
    if not (folder / POINT_FILE).is_file():
        raise ToolError(f"{folder}: no {POINT_FILE} (not a sweep point; run tools/sweep.py with --axis first)")
    spec = json.loads((folder / POINT_FILE).read_text())
    for name in (DONE_FILE, FAILED_FILE):
        (folder / name).unlink(missing_ok=True)
    command = fit_command(folder)
    started = time.time()
    with (folder / LOG_FILE).open("w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.run(command, cwd=spec["cwd"], stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    if not _rank_zero():
        return code == 0
    if code == 0:
        (folder / DONE_FILE).write_text(json.dumps(
            {"returncode": 0, "seconds": seconds, "fingerprint": fingerprint(folder)}, indent=2) + "\n")
    else:
        tail = (folder / LOG_FILE).read_text(errors="replace").splitlines()[-20:]
        (folder / FAILED_FILE).write_text(json.dumps(
            {"returncode": code, "seconds": seconds, "log_tail": tail}, indent=2) + "\n")
    return code == 0


# -- results -------------------------------------------------------------------------------------
def point_metrics(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """The series of the point's newest ``metrics.csv`` (a rerun's new version, not the failed one before it)."""
    logs = find_logs(folder, "csv")
    if not logs:
        return {}
    newest = max((path for path, _ in logs), key=lambda p: p.stat().st_mtime)
    return read_csv_metrics(newest)


def reduce_series(points: list[tuple[float, float]], how: str) -> float | None:
    if not points:
        return None
    values = [v for _, v in points]
    return values[-1] if how == "last" else min(values) if how == "min" else max(values)


def collect(points: list[Point], metric: str, reduce: str) -> None:
    for point in points:
        if point.status == "pending":
            point.status = "done" if is_done(point.folder) else (
                "failed" if (point.folder / FAILED_FILE).is_file() else "pending")
        marker = point.folder / DONE_FILE
        if marker.is_file():
            point.seconds = json.loads(marker.read_text()).get("seconds")
        series = point_metrics(point.folder)
        finished = point.status in ("done", "ran", "skipped")
        point.metric = reduce_series(series.get(metric, []), reduce) if finished else None
        if finished and not series:  # e.g. the CLI's default loggers, which write under runs/, not the folder
            point.status += " (no metrics.csv under the folder: give the base config a CSVLogger under " \
                            "${trainer.default_root_dir})"
        steps = [s for values in series.values() for s, _ in values]
        point.steps = int(max(steps)) + 1 if steps else None


def best_point(points: list[Point], mode: str) -> Point | None:
    scored = [p for p in points if p.metric is not None and math.isfinite(p.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda p: p.metric)


def write_results(points: list[Point], axes: dict[str, list[Any]], out: Path, metric: str, mode: str,
                  reduce: str) -> tuple[str, Point | None]:
    best = best_point(points, mode)
    keys = list(axes)
    headers = ["point", *map(short_key, keys), f"{metric} ({reduce})", "status", "steps", "seconds", "best"]
    rows = [[p.name, *(short_value(p.values[k]) for k in keys), p.metric, p.status, p.steps,
             None if p.seconds is None else round(p.seconds, 1), "**best**" if p is best else ""] for p in points]
    text = f"# Sweep: {metric} ({reduce}; best = {mode})\n\n" + markdown_table(headers, rows) + "\n"
    if best is not None:
        text += f"\nBest point: {best.name} ({', '.join(f'{k}={best.values[k]}' for k in keys)}): " \
                f"{metric} = {best.metric:.6g}\n"
    (out / "results.md").write_text(text)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", *keys, metric, "status", "steps", "seconds", "best"])
        for p in points:
            writer.writerow([p.name, *(p.values[k] for k in keys), "" if p.metric is None else p.metric, p.status,
                             p.steps or "", "" if p.seconds is None else f"{p.seconds:.1f}", int(p is best)])
    return text, best


def _axis_positions(values: list[Any]) -> tuple[list[float], bool, list[str]]:
    """x positions, whether to use a log scale, tick labels."""
    labels = [short_value(v) for v in values]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        numbers = [float(v) for v in values]
        positive = all(v > 0 for v in numbers)
        return numbers, positive and max(numbers) / min(numbers) >= 10, labels
    return list(range(len(values))), False, labels


def plot_results(points: list[Point], axes: dict[str, list[Any]], metric: str, path: Path | None = None):
    """A line plot per axis (one line per combination of the other axes) and a heatmap for two axes."""
    plt = pyplot()
    keys = list(axes)
    panels = len(keys) + (1 if len(keys) == 2 else 0)
    fig, grid_axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.8), squeeze=False)
    panel_axes = list(grid_axes[0])
    by_values = {tuple(repr(p.values[k]) for k in keys): p for p in points}
    for ax, key in zip(panel_axes, keys, strict=False):
        others = [k for k in keys if k != key]
        xs, log, labels = _axis_positions(axes[key])
        for i, combo in enumerate(itertools.product(*(axes[k] for k in others))):
            fixed = dict(zip(others, combo, strict=True))
            ys = []
            for value in axes[key]:
                values = {**fixed, key: value}
                point = by_values[tuple(repr(values[k]) for k in keys)]
                ys.append(point.metric if point.metric is not None else math.nan)
            name = ", ".join(f"{short_key(k)}={short_value(v)}" for k, v in fixed.items()) or metric
            ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
        if log:
            ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set(xlabel=short_key(key), ylabel=metric, title=f"{metric} vs {short_key(key)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if len(keys) == 2:
        ax = panel_axes[-1]
        a, b = keys
        metrics = [[by_values[(repr(va), repr(vb))].metric for vb in axes[b]] for va in axes[a]]
        matrix = [[math.nan if m is None else m for m in row] for row in metrics]
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(axes[b])), [short_value(v) for v in axes[b]])
        ax.set_yticks(range(len(axes[a])), [short_value(v) for v in axes[a]])
        ax.set(xlabel=short_key(b), ylabel=short_key(a), title=metric)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if math.isfinite(value):  # dark text on the bright end of the colour map
                    light = image.norm(value) > 0.6
                    ax.text(j, i, f"{value:.4g}", ha="center", va="center", color="black" if light else "white",
                            fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig, panel_axes


# -- launching -----------------------------------------------------------------------------------
def point_line(point: Point) -> str:
    return shlex.join([sys.executable, str(SWEEP_SCRIPT), "--point", str(point.folder.resolve())])


def write_sbatch(points: list[Point], out: Path, sbatch: str, cwd: Path) -> Path:
    folders = " ".join(shlex.quote(str(p.folder.resolve())) for p in points)
    options = [f"#SBATCH {option}" for option in _sbatch_options(sbatch)]
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={out.name}",
        f"#SBATCH --array=0-{len(points) - 1}",
        f"#SBATCH --output={out.resolve()}/slurm-%A_%a.log",
        *options,
        "# one array task per unfinished sweep point; each runs the point's fit and writes its marker",
        f"POINTS=({folders})",
        f"cd {shlex.quote(str(cwd))}",
        f"srun {shlex.quote(sys.executable)} {shlex.quote(str(SWEEP_SCRIPT))} "
        '--point "${POINTS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ])
    path = out / "sweep.sbatch"
    path.write_text(script)
    return path


def _sbatch_options(text: str) -> list[str]:
    """``'--gres=gpu:8 --time=12:00:00'`` -> ``['--gres=gpu:8', '--time=12:00:00']``."""
    return shlex.split(text) if text else []


def sweep(configs: Sequence[str], axes: dict[str, list[Any]], out: str | Path, overrides: dict[str, Any] | None = None,
          metric: str = "val/nll", mode: str = "min", reduce: str = "last", launch: str = "run",
          launcher: Sequence[str] = (), force: bool = False, collect_only: bool = False, sbatch: str = "",
          progress: bool = True) -> dict[str, Any]:
    """Prepare, run (or print) and collect a sweep; returns the points, the best one and the figure."""
    from dft_lightning.progress import Progress

    out, cwd = Path(out), Path.cwd()
    paths = [Path(c).resolve() for c in configs]
    missing = [str(c) for c, p in zip(configs, paths, strict=True) if not p.is_file()]
    if missing:
        raise ToolError(f"--config {missing[0]}: no such file")
    points = grid(axes, out)
    if not collect_only:
        for point in points:
            write_point(point, paths, overrides or {}, launcher, cwd)
    elif not any((p.folder / POINT_FILE).is_file() for p in points):
        raise ToolError(f"--collect: no sweep points with these axes under {out}")
    todo = [p for p in points if force or not is_done(p.folder)]
    for point in points:
        if point not in todo:
            point.status = "skipped"
    if not collect_only and launch == "run":
        counter = Progress("sweep", len(todo), "points", enabled=False)  # its line follows each point's
        for point in todo:
            ok = run_point(point.folder)
            point.status = "ran" if ok else "failed"
            counter.update()
            state = "done" if ok else f"FAILED (see {point.folder / LOG_FILE})"
            print(f"{point.name}: {state}" + (f"  [{counter.line()}]" if progress else ""), flush=True)
    elif not collect_only and todo:
        if launch == "slurm":
            print(f"wrote {write_sbatch(todo, out, sbatch, cwd)}: sbatch it to run {len(todo)} points")
        else:
            print("\n".join(point_line(p) for p in todo))
    skipped = len(points) - len(todo)
    if skipped and not collect_only:
        print(f"{skipped} of {len(points)} points already finished: skipped (--force reruns them)")
    collect(points, metric, reduce)
    text, best = write_results(points, axes, out, metric, mode, reduce)
    fig, _ = plot_results(points, axes, metric, out / "results.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'} and {out / 'results.png'}")
    return {"points": points, "best": best, "figure": fig, "table": text}


def args_file_line(line: str) -> list[str]:
    """One line of an ``@file`` of arguments: shell words, ``#`` comments and blank lines ignored."""
    return shlex.split(line, comments=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.convert_arg_line_to_args = args_file_line  # conf/paper/figure3_*.sweep: flags, one or more per line
    parser.add_argument("--config", action="append", help="base fit config(s), merged left to right")
    parser.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2,...", help="one sweep axis")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override, all points")
    parser.add_argument("--out", default="runs/sweep", help="sweep folder")
    parser.add_argument("--metric", default="val/nll", help="metric of the results table (default: val/nll)")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="which end is best")
    parser.add_argument("--reduce", choices=("last", "min", "max"), default="last",
                        help="value of a run: its last logged value, or its min / max")
    parser.add_argument("--launch", choices=("run", "print", "slurm"), default="run")
    parser.add_argument("--launcher", default="", help="replaces 'python' in the fit command, e.g. "
                                                        "'torchrun --nproc_per_node=8'")
    parser.add_argument("--sbatch", default="", help="extra #SBATCH options for --launch slurm")
    parser.add_argument("--force", action="store_true", help="rerun finished points too")
    parser.add_argument("--collect", action="store_true", help="only rebuild the results table and plot")
    parser.add_argument("--point", default=None, help="run one prepared point folder (what printed lines do)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.point:
        ok = run_point(Path(args.point))
        print(f"{args.point}: {'done' if ok else 'FAILED, see ' + str(Path(args.point) / LOG_FILE)}")
        raise SystemExit(0 if ok else 1)
    if not args.config:
        parser.error("--config is required (the base fit config)")
    if not args.axis:
        parser.error("give at least one --axis KEY=V1,V2,...")
    axes = parse_axes(args.axis)
    overrides = {key: parse_value(value) for key, value in (parse_assignment(s, "--set") for s in args.set)}
    clash = sorted(set(overrides) & set(axes))
    if clash:
        raise ToolError(f"{clash[0]} is both an --axis and a --set key")
    return sweep(args.config, axes, args.out, overrides, args.metric, args.mode, args.reduce, args.launch,
                 shlex.split(args.launcher), args.force, args.collect, args.sbatch, not args.no_progress)


if __name__ == "__main__":
    run_main(main)
