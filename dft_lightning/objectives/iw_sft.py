"""Importance-weighted SFT (Qin & Springenberg, 2025), sequence- or token-level.

Each sequence's summed NLL is weighted by a clipped, detached importance ratio between the current
policy and a frozen reference: ``w = clip(exp(mean_t(logp_t - ref_logp_t)), 0, max_weight)``.
The token-level variant weights each token's NLL by its own clipped ratio,
``clip(sg(p_t / p_ref,t), 0.2, 1.8)``. With the reference equal to the policy every weight is 1
and either level equals SFT.

Not handled here: the reference model itself (``dft_lightning.module`` computes ``ref_logp``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats

LEVELS = ("sequence", "token")


class IWSFT(Objective):
    """Importance-weighted cross-entropy against a reference model.

    Source: Qin & Springenberg, "Supervised Fine Tuning on Curated Data is Reinforcement Learning
    (and can be improved)" (2025); the authors' code ships both levels. Recommended: their
    defaults (``max_weight=16`` for sequences, ``token_clip=(0.2, 1.8)`` for tokens), with the
    frozen starting model as the reference.

    Args:
        max_weight: upper clip of the sequence-level importance weight (the authors use 16);
            unused at token level.
        level: ``"sequence"`` (one weight per sequence, times its summed NLL) or ``"token"`` (one
            weight per token, times its NLL).
        token_clip: ``(low, high)`` clip of the token-level ratio; unused at sequence level.

    Logged (both levels; token-weighted): ``iw/weight_mean``, ``iw/clipped_frac`` (share of tokens
    whose ratio was clipped), ``iw/weight_max``, ``iw/weight_min``.
    """

    requires = frozenset({"reference"})

    def __init__(self, max_weight: float = 16.0, level: str = "sequence",
                 token_clip: Sequence[float] = (0.2, 1.8)) -> None:
        if max_weight <= 0:
            raise ValueError(f"IWSFT.max_weight must be positive, got {max_weight}")
        if level not in LEVELS:
            raise ValueError(f"IWSFT.level must be one of {', '.join(map(repr, LEVELS))}, got {level!r}")
        try:
            low, high = (float(v) for v in token_clip)
        except (TypeError, ValueError):
            raise ValueError(f"IWSFT.token_clip must be two numbers (low, high), got {token_clip!r}") from None
        if not 0.0 <= low <= high:
            raise ValueError(f"IWSFT.token_clip must satisfy 0 <= low <= high, got {token_clip!r}")
        self.max_weight = max_weight
        self.level = level
        self.token_clip = (low, high)

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.ref_logp is None:
            raise ValueError("IWSFT needs reference log-probs (TokenStats.ref_logp is None)")
        if self.level == "token":
            return self._token_level(stats)
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
        return ObjectiveOutput(loss=loss, metrics={**metrics, **_extremes(weight, present)})

    def _token_level(self, stats: TokenStats) -> ObjectiveOutput:
        low, high = self.token_clip
        # Masked positions may hold -inf in both (-inf - -inf is NaN): their ratio is set to 1.
        diff = torch.where(stats.mask, stats.logp.detach() - stats.ref_logp.to(stats.logp.dtype),
                           torch.zeros_like(stats.logp))
        raw = torch.exp(diff)
        weight = raw.clamp(low, high)
        clipped = ((raw < low) | (raw > high)).to(weight.dtype)
        metrics = {"iw/weight_mean": stats.token_mean(weight), "iw/clipped_frac": stats.token_mean(clipped)}
        return ObjectiveOutput(loss=stats.token_sum(weight * stats.nll()),
                               metrics={**metrics, **_extremes(weight, stats.mask)})


def _extremes(weight: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max / min of ``weight`` where ``present``; +-inf (the identities of max / min) when nothing is."""
    inf = torch.tensor(float("inf"), dtype=weight.dtype, device=weight.device)
    if not weight.numel():
        return {"iw/weight_max": -inf, "iw/weight_min": inf}
    return {"iw/weight_max": torch.where(present, weight, -inf).max(),
            "iw/weight_min": torch.where(present, weight, inf).min()}
