"""Compare runs of several objectives (and seeds) on the same benchmarks, problem by problem.

Input: the ``evaluate`` command's output folders (``<benchmark>.jsonl`` with every completion's grade,
one row per problem, and ``summary.json``; the training callback's ``<log dir>/eval/step-<N>/``, sharded
ones with their ``rank-*/`` parts), each as ``LABEL=FOLDER``. Folders with the same label are seeds of
one run and are pooled: each problem's samples from every seed together::

    python tools/compare.py DFT=runs/dft_s0/csv/version_0/eval/step-200 DFT=runs/dft_s1/csv/version_0/eval/step-200 \\
        SFT=runs/sft_s0/csv/version_0/eval/step-200 --out runs/compare

Writes ``compare.md`` (also printed), ``compare.json`` and ``compare.png``:

- avg@k per benchmark (mean over problems of each problem's share of correct samples; the paper's
  Average@16) and over benchmarks, with percentile bootstrap confidence intervals from resampling
  problems (``--bootstrap`` resamples, ``--seed``; the draws are ``numpy.random.default_rng(seed)
  .integers(0, n, (B, n))`` for a benchmark of n problems, the same draws for every run, and the
  interval of the mean over benchmarks comes from averaging the benchmarks' b-th resamples);
- paired comparisons of the first label with every other one (``--pairs all``: every pair) on the
  problems both have: problems fixed (a higher share of correct samples than the first run's), broken
  (lower), tied, the mean difference with a paired bootstrap interval, and an exact two-sided sign test
  on fixed vs broken (with one sample per problem this is McNemar's exact test);
- the cost of each run when its training log is found (a ``metrics.csv`` up to three folders above the
  evaluation folder, as the training callback lays them out): optimizer steps, supervised tokens
  (``train/tokens_seen``), training seconds (the sum over steps of supervised tokens / tokens per second:
  time in training steps, not in validation or evaluation) and the objective (from ``hparams.yaml``),
  averaged over the seeds.

Not handled here: weighting benchmarks by size (the mean over benchmarks is unweighted), pass@k
intervals, the cost of evaluation itself.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instruments_common import ToolError, markdown_table, pyplot, read_csv_metrics, run_main, split_label  # noqa: E402

Problems = dict[str, list[bool]]  # problem id -> grades of its samples


# -- reading -------------------------------------------------------------------------------------
def read_generations(folder: str | Path) -> dict[str, Problems]:
    """``{benchmark: {problem id: [correct, ...]}}`` from an evaluation folder (and its ``rank-*`` shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolError(f"{folder}: no such evaluation folder")
    files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("rank-*/*.jsonl"))
    if not files:
        raise ToolError(f"{folder}: no <benchmark>.jsonl generation files (the evaluate command's --output_dir)")
    out: dict[str, Problems] = {}
    for path in files:
        problems = out.setdefault(path.stem, {})
        with path.open() as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    correct = [bool(x) for x in row["correct"]]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ToolError(f"{path}:{line_number}: not a generation row with 'correct' grades ({e})") from None
                pid = str(row["id"]) if row.get("id") is not None else f"#{line_number}"
                if pid in problems:
                    raise ToolError(f"{path}:{line_number}: problem {pid} appears twice")
                if not correct:
                    raise ToolError(f"{path}:{line_number}: problem {pid} has no graded samples")
                problems[pid] = correct
    return out


def pool(folders: Sequence[str | Path]) -> dict[str, Problems]:
    """Several seeds of one run: each problem's samples from every folder, concatenated (in folder order).

    A benchmark counts only when every seed has it, and a problem only when every seed has it.
    """
    parts = [read_generations(f) for f in folders]
    pooled: dict[str, Problems] = {}
    for bench in sorted(set.intersection(*(set(p) for p in parts))):
        ids = [pid for pid in parts[0][bench] if all(pid in p[bench] for p in parts[1:])]
        pooled[bench] = {pid: [mark for p in parts for mark in p[bench][pid]] for pid in ids}
    return pooled


def per_problem(problems: Problems, ids: Sequence[str]) -> np.ndarray:
    """Each problem's share of correct samples, in ``ids`` order."""
    return np.array([sum(problems[pid]) / len(problems[pid]) for pid in ids], dtype=np.float64)


# -- statistics ----------------------------------------------------------------------------------
def resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``[resamples]`` means of ``values`` resampled with replacement (``default_rng(seed).integers(0, n, (B, n))``)."""
    n = len(values)
    if n == 0:
        return np.full(resamples, np.nan)
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return values[index].mean(axis=1)


def interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap means."""
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def sign_test(fixed: int, broken: int) -> float:
    """Exact two-sided sign test (binomial, p = 1/2) of ``fixed`` vs ``broken``; 1.0 when both are zero."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Run:
    label: str
    folders: list[str]
    problems: dict[str, Problems] = field(default_factory=dict)
    cost: dict[str, Any] | None = None


def common_ids(runs: Sequence[Run], bench: str) -> list[str]:
    first = runs[0].problems[bench]
    return [pid for pid in first if all(pid in r.problems[bench] for r in runs[1:])]


def compare(runs: Sequence[Run], resamples: int = 10000, seed: int = 0, confidence: float = 0.95,
            pairs: str = "first") -> dict[str, Any]:
    """avg@k with intervals per run and benchmark (and the mean over benchmarks), paired comparisons."""
    benchmarks = sorted(set.intersection(*(set(r.problems) for r in runs)))
    if not benchmarks:
        raise ToolError("the runs have no benchmark in common")
    scores: dict[str, Any] = {}
    boot: dict[str, dict[str, np.ndarray]] = {}
    for run in runs:
        scores[run.label], boot[run.label] = {}, {}
        for bench in benchmarks:
            ids = common_ids(runs, bench)  # every run on the same problems
            values = per_problem(run.problems[bench], ids)
            means = resample_means(values, resamples, seed)
            boot[run.label][bench] = means
            samples = sorted({len(run.problems[bench][pid]) for pid in ids})
            scores[run.label][bench] = {"avg": float(values.mean()) if len(values) else math.nan,
                                        "interval": interval(means, confidence), "problems": len(ids),
                                        "samples_per_problem": samples}
        macro = np.mean([boot[run.label][b] for b in benchmarks], axis=0)
        scores[run.label]["mean"] = {"avg": float(np.mean([scores[run.label][b]["avg"] for b in benchmarks])),
                                     "interval": interval(macro, confidence)}
    chosen = ([(runs[0], other) for other in runs[1:]] if pairs == "first"
              else [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]])
    paired = []
    for a, b in chosen:
        for bench in benchmarks:
            ids = common_ids(runs, bench)
            before, after = per_problem(a.problems[bench], ids), per_problem(b.problems[bench], ids)
            diff = after - before
            fixed, broken = int((diff > 0).sum()), int((diff < 0).sum())
            paired.append({"a": a.label, "b": b.label, "benchmark": bench, "problems": len(ids), "fixed": fixed,
                           "broken": broken, "ties": len(ids) - fixed - broken,
                           "difference": float(diff.mean()) if len(ids) else math.nan,
                           "interval": interval(resample_means(diff, resamples, seed), confidence),
                           "p_value": sign_test(fixed, broken)})
    return {"benchmarks": benchmarks, "scores": scores, "paired": paired, "confidence": confidence,
            "resamples": resamples, "seed": seed}


# -- cost ----------------------------------------------------------------------------------------
def training_log(folder: Path) -> Path | None:
    """The ``metrics.csv`` of the training run an evaluation folder belongs to (up to three folders up)."""
    for parent in list(Path(folder).resolve().parents)[:3]:
        if (parent / "metrics.csv").is_file():
            return parent / "metrics.csv"
    return None


def run_cost(metrics_csv: Path) -> dict[str, Any]:
    series = read_csv_metrics(metrics_csv)
    tokens = dict(series.get("train/supervised_tokens", []))
    rates = dict(series.get("train/tokens_per_s", []))
    seconds = sum(tokens[s] / rates[s] for s in tokens if rates.get(s))
    seen = series.get("train/tokens_seen") or [(0.0, sum(tokens.values()))]
    objective = None
    hparams = metrics_csv.parent / "hparams.yaml"
    if hparams.is_file():
        import yaml

        objective = (yaml.safe_load(hparams.read_text()) or {}).get("objective")
    return {"steps": len(tokens), "supervised_tokens": seen[-1][1], "train_seconds": seconds,
            "objective": None if objective is None else str(objective), "log": str(metrics_csv)}


def pooled_cost(folders: Sequence[str]) -> dict[str, Any] | None:
    """Mean cost over the seeds whose training log is found (``None`` when none is)."""
    costs = [run_cost(log) for log in (training_log(Path(f)) for f in folders) if log is not None]
    if not costs:
        return None
    out = {key: float(np.mean([c[key] for c in costs])) for key in ("steps", "supervised_tokens", "train_seconds")}
    objectives = sorted({c["objective"] for c in costs if c["objective"]})
    out.update({"objective": ", ".join(objectives) or None, "runs_with_logs": len(costs)})
    return out


# -- output --------------------------------------------------------------------------------------
def _ci(entry: dict[str, Any], percent: bool = True) -> str:
    scale = 100 if percent else 1
    lo, hi = entry["interval"]
    return f"{scale * entry['avg']:.2f} [{scale * lo:.2f}, {scale * hi:.2f}]"


def report(runs: Sequence[Run], result: dict[str, Any]) -> str:
    benchmarks, scores = result["benchmarks"], result["scores"]
    level = f"{100 * result['confidence']:g}%"
    headers = ["run", "seeds"]
    for bench in benchmarks:  # k: samples per problem of one seed
        ks = sorted({s // len(r.folders) for r in runs for s in scores[r.label][bench]["samples_per_problem"]})
        k = ks[0] if len(ks) == 1 else "k"
        headers.append(f"{bench} avg@{k} ({scores[runs[0].label][bench]['problems']} problems)")
    headers.append("mean")
    rows = [[r.label, len(r.folders), *(_ci(scores[r.label][b]) for b in benchmarks), _ci(scores[r.label]["mean"])]
            for r in runs]
    parts = [f"## Accuracy (%), {level} bootstrap intervals over problems ({result['resamples']} resamples, "
             f"seed {result['seed']}); seeds pooled per problem", markdown_table(headers, rows)]
    if result["paired"]:
        rows = [[f"{p['b']} vs {p['a']}", p["benchmark"], p["problems"], p["fixed"], p["broken"], p["ties"],
                 f"{100 * p['difference']:+.2f} [{100 * p['interval'][0]:+.2f}, {100 * p['interval'][1]:+.2f}]",
                 f"{p['p_value']:.3g}"] for p in result["paired"]]
        parts += [f"## Paired, problem by problem (fixed: a higher share of correct samples than the first run's; "
                  f"difference in points, {level} paired bootstrap; p: exact sign test on fixed vs broken)",
                  markdown_table(["pair", "benchmark", "problems", "fixed", "broken", "ties", "difference", "p"], rows)]
    rows = [[r.label, len(r.folders), *((r.cost["steps"], r.cost["supervised_tokens"], r.cost["train_seconds"],
                                        r.cost["objective"]) if r.cost else ("-", "-", "-", "-"))] for r in runs]
    parts += ["## Cost per run (mean over seeds; training steps only)",
              markdown_table(["run", "seeds", "steps", "supervised tokens", "train seconds", "objective"], rows)]
    return "\n\n".join(parts) + "\n"


def plot(runs: Sequence[Run], result: dict[str, Any], path: str | Path | None = None):
    """Grouped bars: avg@k per benchmark (and the mean), one colour per run, intervals as error bars."""
    plt = pyplot()
    groups = [*result["benchmarks"], "mean"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(runs)) / 2 + 2), 4.2))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        entries = [result["scores"][run.label][g] for g in groups]
        heights = [100 * e["avg"] for e in entries]
        errors = [[100 * (e["avg"] - e["interval"][0]) for e in entries],
                  [100 * (e["interval"][1] - e["avg"]) for e in entries]]
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, color=f"C{i % 10}", label=f"{run.label} ({len(run.folders)} "
               f"seed{'s' if len(run.folders) > 1 else ''})")
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel="avg@k (%)", title=f"accuracy with {100 * result['confidence']:g}% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=FOLDER", help="an evaluation folder; a repeated label "
                                                                        "pools seeds")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level")
    parser.add_argument("--pairs", choices=("first", "all"), default="first",
                        help="compare the first label with each other one, or every pair")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        parser.error("--confidence must be in (0, 1)")
    if args.bootstrap < 1:
        parser.error("--bootstrap must be >= 1")
    grouped: dict[str, list[str]] = {}
    for spec in args.runs:
        label, folder = split_label(spec)
        grouped.setdefault(label, []).append(folder)
    runs = [Run(label, folders, pool(folders), pooled_cost(folders)) for label, folders in grouped.items()]
    for run in runs:
        if not run.problems:
            raise ToolError(f"{run.label}: its seeds have no benchmark in common")
    result = compare(runs, args.bootstrap, args.seed, args.confidence, args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(runs, result)
    (out / "compare.md").write_text(text)
    plot(runs, result, out / "compare.png")
    saved = {**result, "runs": [{"label": r.label, "folders": r.folders, "cost": r.cost} for r in runs]}
    (out / "compare.json").write_text(json.dumps(saved, indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return {**saved, "run_objects": runs}


if __name__ == "__main__":
    run_main(main)
