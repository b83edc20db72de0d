"""Focal cross-entropy: ``-(1 - sg(p))^gamma log p``, the inverse of DFT's weighting.

Where DFT weights a token by its probability (learn what the model already finds likely), focal
loss weights it by the probability of being wrong (learn what it finds unlikely). The DFT paper
discusses it as the opposite design choice.

Not handled here: focal loss's class-balancing factor (no classes here).
"""

from __future__ import annotations

import math

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class Focal(Objective):
    """``-(1 - sg(p_t))^gamma log p_t``, divided by the step's token count.

    Source: Lin et al., "Focal Loss for Dense Object Detection" (2017), the foil of the DFT paper
    (Wu et al., 2025). Recommended: ``gamma=2`` (Lin et al.'s default); ``gamma=0`` is SFT.

    Args:
        gamma: focusing exponent, ``>= 0``.

    Logged: ``focal/weight_mean``.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"Focal.gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = gamma

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        weight = (-torch.expm1(stats.logp.detach())) ** self.gamma  # (1 - p)^gamma, 1 - p accurate near p = 1
        return ObjectiveOutput(
            loss=stats.token_sum(weight * stats.nll()),
            metrics={"focal/weight_mean": stats.token_mean(weight)},
        )
