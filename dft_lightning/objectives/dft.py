"""Dynamic Fine-Tuning: each token's cross-entropy weighted by its own detached probability.

Per token: ``-sg(p_t) * log p_t`` (DFT paper, eq. 9), whose gradient is ``-grad p_t``. The weight
comes from the log-probability already computed (``exp(logp).detach()``): no second softmax over
the vocabulary. ``sft_mix`` blends the weight with SFT's constant 1.

Not handled here: the sequence-level weighting of the paper's eq. 8 (``DFTSequence``).
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class DFT(Objective):
    """Probability-weighted cross-entropy: ``-w_t log p_t``, ``w_t = max((1 - sft_mix) sg(p_t) + sft_mix, min_weight)``.

    Source: Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
    Reward Rectification" (2025), eq. 9. Recommended: the defaults (the paper's objective) with the
    paper's lr 5e-5; ``sft_mix=0.3`` is what some DFT forks ship for data the model finds unlikely.

    Args:
        min_weight: floor on the detached weight. ``0`` is the paper's objective; a small floor
            (e.g. ``0.05``) keeps some signal on tokens the model finds very unlikely, which users
            training on long texts ask for.
        sft_mix: share of SFT in the weight, in ``[0, 1]``: ``0`` is DFT, ``1`` is SFT (weight 1).
    """

    def __init__(self, min_weight: float = 0.0, sft_mix: float = 0.0) -> None:
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"DFT.min_weight must be in [0, 1], got {min_weight}")
        if not 0.0 <= sft_mix <= 1.0:
            raise ValueError(f"DFT.sft_mix must be in [0, 1], got {sft_mix}")
        self.min_weight = min_weight
        self.sft_mix = sft_mix

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        weight = torch.exp(stats.logp.detach())
        if self.sft_mix > 0:
            weight = (1.0 - self.sft_mix) * weight + self.sft_mix
        if self.min_weight > 0:
            weight = weight.clamp_min(self.min_weight)
        per_token = weight * stats.nll()
        return ObjectiveOutput(
            loss=stats.token_sum(per_token),
            metrics={"dft/weight_mean": stats.token_mean(weight)},
        )
