"""``DemoReport``: what a run did, in numbers, two pictures and plain words (the demo's closing printout).

A training callback. Before the first step and after the last it takes the probability the model gives
every supervised token of the first ``rows`` validation rows (the training path's own chunked
statistics, ``instruments.token_probabilities``, under ``no_grad``: two forwards over those rows). At the
end, on rank zero, it writes to ``<log dir>/report/`` (or ``dirpath``):

- ``token_probs.png``: the before/after distributions overlaid (the DFT paper's Figure 2 for this run);
- ``curves.png``: the run's logged curves against the step (train loss and NLL, the objective's weight,
  validation NLL, the evaluation callback's accuracies);
- ``report.json``: the numbers below;

and prints them: accuracy before and after per benchmark of the ``EvaluationCallback`` in the same
trainer (listed before this callback, so its final evaluation has run), with the paired count (problems
fixed: wrong before and right after; broken: the reverse), validation NLL before and after, and the
token-probability quantiles and low-probability share before and after, followed by a few sentences on how
to read them (DFT's NLL can rise while accuracy rises; DFT barely trains tokens that start unlikely) and the
commands of the runs to compare (``companion``: the same text in each of them, e.g. the demo with DFT and with
SFT).

Not handled here: several processes' shards of an evaluation (the paired counts read rank zero's
generation files; with ``shard_across_ranks`` they are not paired), runs resumed after the first step (no
"before" probabilities: the report says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dft_lightning.instruments import probability_summary, token_probabilities
from dft_lightning.plotting import matching_metrics, plot_probabilities, plot_runs, read_csv_metrics

CURVES = ("train/loss", "train/nll", "val/nll", "*/weight_mean", "token_probs/share_0_0.001",
          "token_probs/share_0.001_0.01", "eval/*/avg@*")
LOW = 0.01  # "unlikely": the share of tokens below this probability is reported


def paired_counts(before: dict[str, bool], after: dict[str, bool]) -> dict[str, int]:
    """Correct counts of two gradings of the same problems (id -> correct) and the paired changes."""
    common = sorted(set(before) & set(after))
    return {
        "problems": len(common),
        "before": sum(before[p] for p in common),
        "after": sum(after[p] for p in common),
        "fixed": sum(after[p] and not before[p] for p in common),
        "broken": sum(before[p] and not after[p] for p in common),
    }


def read_grades(path: Path) -> dict[str, bool]:
    """``{problem id: correct}`` from an evaluation's ``<benchmark>.jsonl`` (greedy: the first sample's grade)."""
    grades = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                grades[str(row["id"])] = bool(row["correct"][0]) if row["correct"] else False
    return grades


def low_share(probs: np.ndarray, below: float = LOW) -> float:
    return float((probs < below).mean()) if len(probs) else float("nan")


class DemoReport(L.Callback):
    """The closing report of a run (see the module docstring).

    Args:
        rows: validation rows whose supervised tokens make the before/after histogram.
        dirpath: where the report goes (default ``<trainer.log_dir>/report``).
        companion: the commands of the runs to compare, printed as given (the demo: with DFT and with SFT).
        plot_command: a command to print that draws this run and the companion in one picture.
    """

    def __init__(self, rows: int = 64, dirpath: str | None = None, companion: str | None = None,
                 plot_command: str | None = None) -> None:
        if rows < 1:
            raise ValueError(f"DemoReport rows must be at least 1, got {rows}")
        self.rows, self.dirpath, self.companion, self.plot_command = rows, dirpath, companion, plot_command
        self.before: np.ndarray | None = None
        self.after: np.ndarray | None = None
        self.rows_used = 0
        self.report: dict[str, Any] | None = None

    # -- probabilities -----------------------------------------------------------------------------
    def _probabilities(self, trainer: L.Trainer, module: L.LightningModule) -> np.ndarray | None:
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "datasets", {}).get("val"):
            return None
        batches, counts = [], []
        for item in datamodule.val_dataloader():
            for mb in item if isinstance(item, list | tuple) else [item]:
                batches.append(mb)
                counts.append(sum(row is not None for row in mb.row_ids))  # not the masked rows filling the last
                if sum(counts) >= self.rows:
                    break
            if sum(counts) >= self.rows:
                break
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([len(batches)], device=module.device)  # every rank runs as many forwards (FSDP)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            batches, counts = batches[: int(count)], counts[: int(count)]
        self.rows_used = sum(counts)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                probs, _ = token_probabilities(module, batches, progress=False)
        finally:
            module.train(was_training)
        return probs

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.before = self._probabilities(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.after = self._probabilities(trainer, module)
        if not trainer.is_global_zero:
            return
        try:
            self.report = self._write(trainer, module)
        except Exception as e:  # a report must never cost the run: it is already trained and saved
            rank_zero_warn(f"the run's report could not be written: {type(e).__name__}: {e}")
            return
        rank_zero_info(self.format(self.report))

    # -- the report --------------------------------------------------------------------------------
    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "report"

    def _write(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        from dft_lightning.objectives.base import objective_spec

        report: dict[str, Any] = {"objective": type(module.objective).__name__,
                                  "objective_args": objective_spec(module.objective).get("init_args") or {},
                                  "steps": trainer.global_step, "folder": str(folder)}
        report["evaluation"] = self._evaluation(trainer)
        report["val_nll"] = self._val_nll(trainer, module)
        if self.after is not None:
            shown = {"before": self.before, "after": self.after} if self.before is not None else {"after": self.after}
            summaries = {}
            for label, probs in shown.items():
                summary = probability_summary(probs)
                summaries[label] = {"count": summary["count"], "mean": summary["mean"],
                                    "quantiles": summary["quantiles"], f"share_below_{LOW:g}": low_share(probs)}
            report["token_probs"] = summaries
            report["token_probs_rows"] = self.rows_used
            plot_probabilities(shown, folder / "token_probs.png",
                               title=f"{report['objective']}: supervised-token probabilities of {self.rows_used} "
                                     "validation rows, before and after training")
            report["token_probs_png"] = str(folder / "token_probs.png")
        curves = self._curves(trainer, folder / "curves.png")
        if curves:
            report["curves_png"] = curves
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    def _evaluation(self, trainer: L.Trainer) -> dict[str, Any]:
        from dft_lightning.evaluation.callback import EvaluationCallback

        callback = next((cb for cb in trainer.callbacks if isinstance(cb, EvaluationCallback)), None)
        if callback is None or len(callback.history) < 2:
            return {}
        (first, _), (last, _) = callback.history[0], callback.history[-1]
        root = callback._root(trainer)
        out = {}
        for spec in callback.benchmarks:
            name = spec.label
            before, after = root / f"step-{first}" / f"{name}.jsonl", root / f"step-{last}" / f"{name}.jsonl"
            if before.exists() and after.exists():
                out[name] = {"steps": [first, last], **paired_counts(read_grades(before), read_grades(after))}
        return out

    def _val_nll(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float] | None:
        baseline = getattr(module, "_baseline", None)
        final = trainer.callback_metrics.get("val/nll")
        if not baseline or final is None:
            return None
        return {"before": baseline["val/nll"], "after": float(final)}

    def _curves(self, trainer: L.Trainer, path: Path) -> str | None:
        from lightning.pytorch.loggers import CSVLogger

        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv is None:
            return None
        csv.save()
        metrics_file = Path(csv.log_dir) / "metrics.csv"
        if not metrics_file.exists():
            return None
        runs = {type(trainer.lightning_module.objective).__name__: read_csv_metrics(metrics_file)}
        chosen = matching_metrics(runs, CURVES)
        if not chosen:
            return None
        import matplotlib.pyplot as plt

        fig, _ = plot_runs(runs, chosen, path, columns=4)
        plt.close(fig)
        return str(path)

    def format(self, report: dict[str, Any]) -> str:
        """The printout: numbers first, then how to read them, then where the pictures are."""
        lines = [f"[dft_lightning] report: {report['objective']}, {report['steps']} optimizer steps"]
        for name, ev in report.get("evaluation", {}).items():
            n = ev["problems"]
            gain = 100.0 * (ev["after"] - ev["before"]) / max(n, 1)
            lines.append(f"  {name}: {ev['before']}/{n} correct before, {ev['after']}/{n} after ({gain:+.1f} points); "
                         f"paired: {ev['fixed']} fixed, {ev['broken']} broken")
        nll = report.get("val_nll")
        if nll:
            lines.append(f"  validation NLL: {nll['before']:.3f} before, {nll['after']:.3f} after")
        probs = report.get("token_probs", {})
        if probs:
            low = f"share_below_{LOW:g}"
            parts = [f"{label}: median {s['quantiles'].get('q50', float('nan')):.3f}, {100 * s[low]:.1f}% below {LOW:g}"
                     for label, s in probs.items()]
            rows = report["token_probs_rows"]
            lines.append(f"  supervised-token probabilities ({rows} validation rows): " + "; ".join(parts))
        lines += ["", *self.reading(report), ""]
        for key, what in (("curves_png", "curves"), ("token_probs_png", "token probabilities before/after")):
            if key in report:
                lines.append(f"  {what}: {report[key]}")
        lines.append(f"  numbers: {report['folder']}/report.json")
        if self.companion:
            lines.append(f"  the runs to compare: {self.companion}")
        if self.plot_command:
            lines.append(f"  both runs in one picture: {self.plot_command}")
        return "\n".join(lines)

    @staticmethod
    def reading(report: dict[str, Any]) -> list[str]:
        """A few sentences on how to read this run's numbers (only those its numbers call for)."""
        out = ["How to read this:"]
        nll, probs = report.get("val_nll"), report.get("token_probs", {})
        rose = nll is not None and nll["after"] > nll["before"]
        gained = any(ev["after"] > ev["before"] for ev in report.get("evaluation", {}).values())
        floor = float(report.get("objective_args", {}).get("min_weight") or 0.0)
        if report["objective"].startswith("DFT"):
            out.append("- DFT weights each token's loss by the model's own (detached) probability of it: tokens the "
                       "model already finds likely are pushed hardest, unlikely ones barely move.")
            if floor > 0:
                out.append(f"- This run floors that weight at min_weight = {floor:g}, so tokens that start unlikely "
                           f"still train, at {floor:g} of SFT's rate. In the demo, plain DFT (min_weight 0) leaves "
                           "the data's format tokens (the solutions' first words, \\times, $\\boxed) near p = 0 "
                           "and accuracy does not rise (conf/demo.yaml says what was tried).")
            if rose and gained:
                out.append("- The validation NLL rose while accuracy rose: NLL averages over every token, and the few "
                           "unlikely ones DFT leaves behind (or pushes down) dominate it; greedy answers depend on the "
                           "likely path, which DFT sharpens. NLL is not DFT's objective.")
            elif rose:
                out.append("- The validation NLL rose: DFT sharpened what the model already preferred and left the "
                           "unlikely tokens where they were (or lower).")
        if "before" in probs and "after" in probs:
            before, after = probs["before"], probs["after"]
            low = f"share_below_{LOW:g}"
            line = f"- Tokens below p = {LOW:g}: {100 * before[low]:.1f}% before, {100 * after[low]:.1f}% after. "
            if report["objective"].startswith("DFT"):
                line += ("Under DFT these move least (their weight is their probability, or min_weight when that is "
                         "larger), while SFT pulls every token up. The DFT paper's Figure 2 finds DFT polarising the "
                         "distribution (mass leaves the middle for both ends): compare the picture.")
            else:
                line += "This objective's weights decide which tokens move: compare the picture with a DFT run's."
            out.append(line)
        if report.get("evaluation") and not gained:
            out.append("- Accuracy did not rise in this run: too few steps, or a learning rate too low for DFT "
                       "(its effective step is smaller than SFT's by the mean weight).")
        return out
