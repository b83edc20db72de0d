"""Dynamic Fine-Tuning: each token's cross-entropy weighted by its own detached probability.

Per token: ``-sg(p_t) * log p_t`` (DFT paper, eq. 9), whose gradient is ``-grad p_t``. The weight
comes from the log-probability already computed (``exp(logp).detach()``): no second softmax over
the vocabulary.
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class DFT(Objective):
    """Probability-weighted cross-entropy.

    Args:
        min_weight: floor on the detached weight ``p_t``. ``0`` is the paper's objective; a small
            floor (e.g. ``0.05``) keeps some signal on tokens the model finds very unlikely, which
            users training on long texts ask for.
    """

    def __init__(self, min_weight: float = 0.0) -> None:
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"DFT.min_weight must be in [0, 1], got {min_weight}")
        self.min_weight = min_weight

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        weight = torch.exp(stats.logp.detach())
        if self.min_weight > 0:
            weight = weight.clamp_min(self.min_weight)
        per_token = weight * stats.nll()
        return ObjectiveOutput(
            loss=stats.token_sum(per_token),
            metrics={"dft/weight_mean": stats.token_mean(weight)},
        )
