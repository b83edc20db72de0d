"""EAFT: entropy-aware fine-tuning (2026): each token's NLL weighted by the model's own top-k uncertainty.

Per supervised token: ``(sg(H_k) / ln k)^alpha * (-log p)``, where ``H_k`` is the entropy of the
next-token distribution renormalised over its ``k`` most likely tokens (``topk_entropy``, computed
chunk by chunk with the logits, never over ``[tokens x vocab]`` at once). ``H_k / ln k`` lies in
``[0, 1]``: positions where the model is already confident (one dominant candidate) get little
weight, uncertain positions up to the full NLL. Where DFT down-weights tokens the model finds
unlikely, EAFT down-weights positions where the model is sure, whatever the target.

Recommended: ``k=20``, ``alpha=1``. Logged: ``eaft/weight_mean``, ``eaft/topk_entropy_mean``.
"""

from __future__ import annotations

import math

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class EAFT(Objective):
    """Top-k-entropy-weighted cross-entropy.

    Args:
        k: candidates of the renormalised distribution whose entropy weighs each token (at least 2).
        alpha: exponent of the normalised entropy (``0`` gives SFT).
    """

    requires = frozenset({"topk_entropy"})

    def __init__(self, k: int = 20, alpha: float = 1.0) -> None:
        if int(k) != k or k < 2:
            raise ValueError(f"EAFT.k must be an integer of at least 2, got {k}")
        if alpha < 0:
            raise ValueError(f"EAFT.alpha must be zero or more, got {alpha}")
        self.k, self.alpha = int(k), alpha

    @property
    def statistic_options(self) -> dict[str, dict[str, int]]:
        return {"topk_entropy": {"k": self.k}}

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        entropy = stats.topk_entropy.detach()
        weight = (entropy / math.log(self.k)).clamp(0.0, 1.0) ** self.alpha
        weight = torch.where(stats.mask, weight, torch.zeros_like(weight))
        return ObjectiveOutput(
            loss=stats.token_sum(weight * stats.nll()),
            metrics={"eaft/weight_mean": stats.token_mean(weight), "eaft/topk_entropy_mean": stats.token_mean(entropy)},
        )
