"""Token-probability summaries (the DFT paper's Figure 2) and a callback that logs them during training.

``probability_summary`` turns the probabilities of supervised tokens into fixed numbers: count, mean,
quantiles (``QUANTILES``), the share of tokens in probability bins (``BIN_EDGES``: ``[0, 1e-3)``,
``[1e-3, 1e-2)``, ..., ``[0.9, 1]``) and a histogram over ``HISTOGRAM_BINS`` equal bins of ``[0, 1]``.
``tools/token_probs.py`` (any model, any data set, offline) and ``TokenProbabilityLogger`` (during
training) both use it, so their numbers for the same tokens at the same weights are the same.

``TokenProbabilityLogger`` takes the probabilities from the statistics the training step has already
computed (``on_train_token_stats``, see ``dft_lightning.step.TokenStatsHook``): no extra forward. Every
``every_n_steps`` optimizer steps it keeps the step's supervised tokens (all micro-batches; under data
parallelism gathered from every rank), and after the step logs quantiles and bin shares to every logger
(``token_probs/q50``, ``token_probs/share_0.9_1``, ...) and the histogram to W&B
(``token_probs/histogram``), at the step whose forward produced them: the weights before that step's
update, the same step as that step's ``train/nll`` (after a skipped non-finite step the two step
counters can differ by the number of skips).

Not handled here: per-token-id analyses (``tools/token_probs.py`` does those), reference-model
probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from dft_lightning.batch import MicroBatch
from dft_lightning.errors import UserError

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: Probability bins for shares of tokens; each bin is ``[lo, hi)`` except the last, ``[0.9, 1]``.
BIN_EDGES = (0.0, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0)
HISTOGRAM_BINS = 50
PREFIX = "token_probs"


def quantile_key(q: float) -> str:
    """``q50`` for 0.5, ``q01`` for 0.01."""
    return f"q{round(q * 100):02d}"


def bin_label(lo: float, hi: float) -> str:
    """``[0.001, 0.01)`` (the last bin is closed: ``[0.9, 1]``)."""
    return f"[{lo:g}, {hi:g}" + ("]" if hi == BIN_EDGES[-1] else ")")


def bin_key(lo: float, hi: float) -> str:
    """``share_0.001_0.01``: the metric-name form of a bin."""
    return f"share_{lo:g}_{hi:g}"


def supervised_probabilities(logp: Tensor, mask: Tensor) -> Tensor:
    """``exp(logp)`` of the supervised positions, flattened in row-major order, float64 on the CPU."""
    return logp.detach()[mask.bool()].double().exp().cpu()


def probability_summary(probs: Tensor | np.ndarray) -> dict[str, Any]:
    """Count, mean, quantiles, bin shares and a ``HISTOGRAM_BINS``-bin histogram of probabilities in ``[0, 1]``.

    Quantiles interpolate linearly between order statistics (``numpy.quantile``'s default). An empty input
    gives count 0, ``None`` for the mean and quantiles, zero shares and counts.
    """
    p = np.clip(np.asarray(probs.numpy() if isinstance(probs, Tensor) else probs, dtype=np.float64).ravel(), 0.0, 1.0)
    n = int(p.size)
    bins = []
    for i, (lo, hi) in enumerate(zip(BIN_EDGES[:-1], BIN_EDGES[1:], strict=True)):
        last = i == len(BIN_EDGES) - 2
        count = int(((p >= lo) & ((p <= hi) if last else (p < hi))).sum())
        bins.append({"range": [lo, hi], "label": bin_label(lo, hi), "count": count, "share": count / n if n else 0.0})
    counts, edges = np.histogram(p, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    values = np.quantile(p, QUANTILES).tolist() if n else [None] * len(QUANTILES)
    return {
        "count": n,
        "mean": float(p.mean()) if n else None,
        "quantiles": {quantile_key(q): v for q, v in zip(QUANTILES, values, strict=True)},
        "bins": bins,
        "histogram": {"edges": edges.tolist(), "counts": counts.astype(int).tolist()},
    }


def summary_metrics(summary: dict[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """The scalar metrics of a summary: ``<prefix>/count``, ``/mean``, ``/q50``..., ``/share_<lo>_<hi>``."""
    out = {f"{prefix}/count": float(summary["count"])}
    if summary["count"]:
        out[f"{prefix}/mean"] = summary["mean"]
        out.update({f"{prefix}/{key}": value for key, value in summary["quantiles"].items()})
    out.update({f"{prefix}/{bin_key(*b['range'])}": b["share"] for b in summary["bins"]})
    return out


class TokenProbabilityLogger(L.Callback):
    """Log the distribution of supervised-token probabilities every ``every_n_steps`` optimizer steps.

    Uses the statistics the training step computed (no extra forward). Logged at the step whose forward
    produced them (steps ``0, N, 2N, ...``): quantiles, mean, count and bin shares to every logger, and a
    W&B histogram when a ``WandbLogger`` is among them. ``history`` keeps ``(step, summary)`` pairs on
    every rank (the summaries of all ranks' tokens).

    Args:
        every_n_steps: optimizer steps between two summaries.
        prefix: metric-name prefix.
        keep_history: keep every summary in ``history`` (e.g. for a plot after training).
    """

    def __init__(self, every_n_steps: int = 50, prefix: str = PREFIX, keep_history: bool = True) -> None:
        if every_n_steps < 1:
            raise UserError(f"TokenProbabilityLogger every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps, self.prefix, self.keep_history = every_n_steps, prefix, keep_history
        self.history: list[tuple[int, dict[str, Any]]] = []
        self._step: int | None = None
        self._parts: list[Tensor] = []
        self._logged: set[int] = set()

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step not in self._logged

    def on_train_token_stats(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, stats: Any) -> None:
        step = trainer.global_step
        if not self._due(step):
            return
        if self._step != step:  # first micro-batch of this step
            self._step, self._parts = step, []
        self._parts.append(supervised_probabilities(stats.logp, stats.mask))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._step is None:
            return
        step, parts = self._step, self._parts
        self._step, self._parts = None, []
        self._logged.add(step)  # a skipped (non-finite) step repeats its index: summarised once
        probs = _gather(trainer, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
        summary = probability_summary(probs)
        if self.keep_history:
            self.history.append((step, summary))
        if trainer.is_global_zero:
            self._log(trainer, step, summary)

    def _log(self, trainer: L.Trainer, step: int, summary: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        scalars: dict[str, Any] = summary_metrics(summary, self.prefix)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and summary["count"]:
                import wandb

                hist = summary["histogram"]
                value = wandb.Histogram(np_histogram=(np.asarray(hist["counts"]), np.asarray(hist["edges"])))
                logger.log_metrics({**scalars, f"{self.prefix}/histogram": value}, step=step)  # one W&B row
            else:
                logger.log_metrics(scalars, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"logged": sorted(self._logged)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged = set(state_dict.get("logged", []))


def _gather(trainer: L.Trainer, probs: Tensor) -> Tensor:
    """Every rank's probabilities, concatenated in rank order (unchanged on one process)."""
    if trainer.world_size == 1:
        return probs
    strategy = trainer.strategy
    device = strategy.root_device
    sizes = strategy.all_gather(torch.tensor([probs.numel()], device=device)).reshape(-1).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.float64, device=device)
    padded[: probs.numel()] = probs.to(device)
    gathered = strategy.all_gather(padded).reshape(len(sizes), -1).cpu()
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def token_probabilities(module, batches: Iterable[MicroBatch | list[MicroBatch]], progress: bool = True,
                        description: str = "token probabilities", total: int | None = None):
    """``(probs, targets)``: the probability of every supervised token of ``batches`` (float64) and its id.

    Tokens come in the order of the micro-batches, each row-major, as in ``TokenStats`` (so two models
    on the same batches give aligned arrays).
    """
    from dft_lightning.progress import Progress

    vocab = module.model.head().weight.shape[0]
    one = torch.ones((), device=module.device)
    probs, targets = [], []
    count = total if total is not None else _length(batches)
    with Progress(description, count or 0, "batches", enabled=progress) as bar:
        for item in batches:
            for mb in item if isinstance(item, list | tuple) else [item]:
                if int(mb.labels.max()) >= vocab:
                    raise UserError(f"token id {int(mb.labels.max())} in the data, but the model's vocabulary has "
                                    f"{vocab} entries: compare models that share the data's tokenizer")
                mb = mb.to(module.device)
                stats = module.token_stats(mb, one)
                probs.append(supervised_probabilities(stats.logp, stats.mask))
                targets.append(stats.targets[stats.mask].cpu())
            bar.update()
    if not probs:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy().astype(np.int64)


def _length(items: Any) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
