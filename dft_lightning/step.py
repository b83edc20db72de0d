"""One optimizer step's accounting, in small units that need no Trainer.

- ``supervised_counts``: the supervised target tokens of each micro-batch of a step.
- ``StepMetrics``: sums the step's metrics over micro-batches (objective diagnostics weighted by
  each micro-batch's share of the step's tokens; keys ending in ``_max`` / ``_min`` by max / min),
  then reduces them across ranks in one collective per kind.
- ``NonFinitePolicy``: what a non-finite loss or gradient norm does (``raise``, or ``skip`` the step,
  counted, until too many in a row); its counters are saved in checkpoints.
- ``TokenStatsHook``: the hook through which callbacks see each training micro-batch's statistics
  (no extra forward).

``FineTuneModule.training_step`` strings these together. Not handled here: the forward and backward
passes, gradient clipping, logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dft_lightning.batch import MicroBatch
from dft_lightning.objectives import TokenStats

#: ``reduce(values, op)`` with ``op`` in ``"sum"``, ``"max"``, ``"min"``: across ranks (identity on one).
Reducer = Callable[[Tensor, str], Tensor]


def supervised_counts(batch: Sequence[MicroBatch], device: torch.device | str = "cpu") -> Tensor:
    """``[micro-batches]`` float tensor of supervised target tokens."""
    return torch.tensor([float(mb.supervised_tokens()) for mb in batch], device=device)


def extreme_kind(key: str) -> str | None:
    """``"max"`` / ``"min"`` for keys reduced by extremes, else ``None`` (token-weighted mean)."""
    return "max" if key.endswith("_max") else "min" if key.endswith("_min") else None


class StepMetrics:
    """Metrics of one optimizer step, summed over its micro-batches and then over ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.extremes: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the sum ``name`` (e.g. a loss already divided by the step's token count)."""
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add_objective(self, metrics: dict[str, Tensor], share: Tensor) -> None:
        """An objective's per-micro-batch metrics; ``share``: this micro-batch's part of the step's tokens."""
        for key, value in metrics.items():
            kind = extreme_kind(key)
            if kind is None:
                self.add(key, value * share)
                continue
            value = value.detach().float()
            prev = self.extremes.get(key)
            self.extremes[key] = value if prev is None else (
                torch.maximum(prev, value) if kind == "max" else torch.minimum(prev, value))

    def keys(self) -> list[str]:
        return sorted(self.sums) + sorted(self.extremes)

    def reduce(self, reduce: Reducer, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Every metric reduced across ranks: sums in one collective, then each extreme."""
        names = sorted(self.sums)
        out: dict[str, Tensor] = {}
        if names:
            stacked = torch.stack([torch.as_tensor(self.sums[n], device=device).reshape(()) for n in names])
            out.update(zip(names, reduce(stacked, "sum"), strict=True))
        for key in sorted(self.extremes):
            out[key] = reduce(torch.as_tensor(self.extremes[key], device=device), extreme_kind(key) or "sum")
        return out


class NonFinitePolicy:
    """``raise`` on a non-finite loss or gradient norm, or ``skip`` the step (at most ``max_consecutive`` in a row).

    ``admit`` returns whether the optimizer may step; a skipped step is counted in ``skipped``.
    """

    def __init__(self, mode: str = "raise", max_consecutive: int = 20) -> None:
        if mode not in ("raise", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'raise' or 'skip', got {mode!r}")
        self.mode, self.max_consecutive = mode, max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def admit(self, loss: Tensor | float, grad_norm: Tensor | float, where: str,
              warn: Callable[[str], Any] = print) -> bool:
        loss, grad_norm = float(loss), float(grad_norm)
        if torch.isfinite(torch.tensor([loss, grad_norm])).all():
            self.consecutive = 0
            return True
        message = f"non-finite loss {loss} or gradient norm {grad_norm} at {where}"
        if self.mode == "raise":
            raise FloatingPointError(message + "; set model.on_nonfinite=skip to skip such steps")
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(f"{self.max_consecutive} consecutive non-finite steps; last: {message}")
        warn(f"[dft_lightning] skipping step: {message}")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))


@runtime_checkable
class TokenStatsHook(Protocol):
    """A callback that also has this method sees the statistics of every training micro-batch.

    Called after the micro-batch's backward, with ``stats`` detached (``logp``, ``mask``, ...; the
    ``num_tokens`` of the whole step), on every rank.
    """

    def on_train_token_stats(self, trainer: Any, pl_module: Any, batch: MicroBatch, stats: TokenStats) -> None: ...


def detached(stats: TokenStats) -> TokenStats:
    """``stats`` with every tensor detached (views, no copy)."""
    fields = {k: v.detach() if isinstance(v, Tensor) else v for k, v in vars(stats).items()}
    fields["extra"] = {k: v.detach() for k, v in stats.extra.items()}
    return TokenStats(**fields)
