"""Probability-power objectives: ``-(p^alpha - 1) / alpha`` per token, optionally on a band of ``sg(p)``.

A one-parameter family between the log-likelihood and the probability itself: ``alpha -> 0``
gives ``-log p`` (SFT), ``alpha = 1`` gives ``1 - p`` (whose gradient is DFT's, ``-grad p``). Its
gradient is ``-p^alpha grad log p``: like DFT's weighting, but the weight is not detached and
``alpha`` sets how strongly unlikely tokens are discounted. Thresholds on the detached
probability select which tokens train at all.

Not handled here: detached weights with a floor or SFT mix (``DFT``).
"""

from __future__ import annotations

import math

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class ProbPower(Objective):
    """``-(p_t^alpha - 1) / alpha`` on tokens with ``min_p <= sg(p_t) <= max_p``, divided by the step's token count.

    Source: "Beyond Log Likelihood: Probability-Based Objectives for Supervised Fine-Tuning across
    the Model Capability Continuum" (2025), the ``-(p^alpha - 1) / alpha`` family; ``alpha = 1``
    (``1 - p``) is its recommendation for models that are already strong on the domain, ``-log p``
    for weak ones. The threshold form covers ProFit (train only tokens with ``sg(p) > 0.1``):
    ``ProbPower(alpha=0, min_p=0.1)``.

    Tokens outside the band contribute nothing, but the sum is still divided by the step's token
    count (all supervised tokens), so a narrow band also shrinks the step; ``prob_power/kept_frac``
    logs the share kept. ``alpha = 0`` is computed exactly as ``-log p``; other values through
    ``expm1`` so that small ``alpha`` stays accurate.

    Args:
        alpha: the power, ``>= 0``; ``0`` is SFT, ``1`` is ``1 - p``.
        min_p: train only tokens whose detached probability is at least this (``None``: no bound).
        max_p: train only tokens whose detached probability is at most this (``None``: no bound).
    """

    def __init__(self, alpha: float = 1.0, min_p: float | None = None, max_p: float | None = None) -> None:
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"ProbPower.alpha must be a finite number >= 0, got {alpha!r} (negative powers make "
                             "the loss unbounded as p -> 0)")
        for name, bound in (("min_p", min_p), ("max_p", max_p)):
            if bound is not None and not (isinstance(bound, int | float) and 0.0 <= bound <= 1.0):
                raise ValueError(f"ProbPower.{name} must be in [0, 1] or null, got {bound!r}")
        if min_p is not None and max_p is not None and min_p > max_p:
            raise ValueError(f"ProbPower.min_p={min_p} must not exceed ProbPower.max_p={max_p}")
        self.alpha = float(alpha)
        self.min_p = min_p
        self.max_p = max_p

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        # Masked positions may hold -inf: keep them out of exp so their (zero) gradient stays finite.
        logp = torch.where(stats.mask, stats.logp, torch.zeros_like(stats.logp))
        if self.alpha == 0:
            per_token = -logp
        else:
            per_token = -torch.expm1(self.alpha * logp) / self.alpha
        keep = stats.mask
        p = torch.exp(logp.detach())
        if self.min_p is not None:
            keep = keep & (p >= self.min_p)
        if self.max_p is not None:
            keep = keep & (p <= self.max_p)
        per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
        return ObjectiveOutput(
            loss=stats.token_sum(per_token),
            metrics={"prob_power/kept_frac": stats.token_mean(keep.to(logp.dtype))},
        )
