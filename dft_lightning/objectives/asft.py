"""ASFT: anchored SFT (2025). DFT's per-token loss plus a full-vocabulary KL anchor to a reference model.

Per supervised token: ``-sg(p) log p + kl_weight * KL(pi_ref || pi_theta)``, the KL over the whole
next-token distribution at that position. DFT's weighting alone lets the distribution drift where
the data does not pin it down; the anchor keeps the rest of the distribution near the reference
(the frozen starting model by default, or ``model.reference`` / ``model.reference_update``).

The KL is the ``kl_reference`` statistic: computed chunk by chunk with the policy's logits and
recomputed in backward, from the reference's final hidden states (``[tokens x hidden]``) and its
output projection, which the module keeps for the micro-batch; never ``[tokens x vocab]`` at once.

Recommended: ``kl_weight=0.05``. Logged: ``asft/kl_mean``, ``asft/dft_weight_mean``.
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class ASFT(Objective):
    """DFT with a KL(reference || policy) anchor over the full vocabulary.

    Args:
        kl_weight: weight of the KL term (``0`` is DFT).
    """

    requires = frozenset({"kl_reference"})

    def __init__(self, kl_weight: float = 0.05) -> None:
        if kl_weight < 0:
            raise ValueError(f"ASFT.kl_weight must be zero or more, got {kl_weight}")
        self.kl_weight = kl_weight

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        weight = torch.exp(stats.logp.detach())
        kl = stats.kl_reference
        per_token = weight * stats.nll() + self.kl_weight * kl
        return ObjectiveOutput(
            loss=stats.token_sum(per_token),
            metrics={"asft/kl_mean": stats.token_mean(kl.detach()), "asft/dft_weight_mean": stats.token_mean(weight)},
        )
