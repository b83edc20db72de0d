"""Importance-weighted SFT (Qin & Springenberg, 2025), sequence-level.

Each sequence's summed NLL is weighted by a clipped, detached importance ratio between the current
policy and a frozen reference: ``w = clip(exp(mean_t(logp_t - ref_logp_t)), 0, max_weight)``. With
the reference equal to the policy every weight is 1 and the objective equals SFT.
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class IWSFT(Objective):
    """Sequence-level importance-weighted cross-entropy against a reference model.

    Args:
        max_weight: upper clip of the importance weight (the authors use 16).
    """

    requires = frozenset({"reference"})

    def __init__(self, max_weight: float = 16.0) -> None:
        if max_weight <= 0:
            raise ValueError(f"IWSFT.max_weight must be positive, got {max_weight}")
        self.max_weight = max_weight

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.ref_logp is None:
            raise ValueError("IWSFT needs reference log-probs (TokenStats.ref_logp is None)")
        diff = stats.logp.detach() - stats.ref_logp.to(stats.logp.dtype)
        counts = stats.sequence_token_counts()
        present = counts > 0
        mean_diff = stats.sequence_sum(diff) / counts.clamp_min(1)
        raw = torch.exp(mean_diff)
        weight = raw.clamp(0.0, self.max_weight)
        seq_nll = stats.sequence_sum(stats.nll())
        loss = (weight.to(seq_nll.dtype) * seq_nll).sum() / stats.num_tokens
        # Token-weighted per-sequence diagnostics, so the module's token-weighted reduction is exact.
        tokens = counts.sum().clamp_min(1)
        metrics = {
            "iw/weight_mean": (weight * counts).sum() / tokens,
            "iw/clipped_frac": ((raw > self.max_weight).float() * counts).sum() / tokens,
        }
        # Always the same keys (ranks reduce them together); +-inf are the identities of max / min.
        inf = torch.tensor(float("inf"), dtype=weight.dtype, device=weight.device)
        metrics["iw/weight_max"] = torch.where(present, weight, -inf).max() if weight.numel() else -inf
        metrics["iw/weight_min"] = torch.where(present, weight, inf).min() if weight.numel() else inf
        return ObjectiveOutput(loss=loss, metrics=metrics)
