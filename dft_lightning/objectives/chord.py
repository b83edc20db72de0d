"""CHORD's token weighting of the SFT loss: ``-sg(p (1 - p)) log p``.

The weight ``p (1 - p)`` is largest at ``p = 1/2`` and vanishes at both ends: tokens the model
already predicts (``p -> 1``) and tokens far from its distribution (``p -> 0``) contribute little,
so the SFT signal concentrates on the uncertain ones.

Not handled here: CHORD's mixing of this loss with an on-policy RL loss (only the SFT part is an
objective on fixed data).
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class CHORD(Objective):
    """``-sg(p_t (1 - p_t)) log p_t``, divided by the step's token count.

    Source: "On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and
    Reinforcement Learning via Dynamic Weighting" (CHORD, 2025), the token-wise weighting
    ``phi(p) = p (1 - p)`` of its SFT term. No settings. The weight is at most 1/4, so the loss and
    gradient are smaller than SFT's at the same learning rate; DFT's settings are a starting point.

    Logged: ``chord/weight_mean``.
    """

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        p = torch.exp(stats.logp.detach())
        weight = p * -torch.expm1(stats.logp.detach())  # p (1 - p), 1 - p accurate near p = 1
        return ObjectiveOutput(
            loss=stats.token_sum(weight * stats.nll()),
            metrics={"chord/weight_mean": stats.token_mean(weight)},
        )
