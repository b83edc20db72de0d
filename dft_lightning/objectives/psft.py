"""PSFT: proximal SFT (2025). A PPO-style clipped surrogate with advantage 1 on every supervised token.

Per supervised token: ``-min(r, clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = p / sg(p_old)``.
At ``r = 1`` its gradient is SFT's (``-grad log p``); once a token's probability has risen past
``(1 + clip_high) p_old`` it stops pushing, which keeps the policy near ``p_old``. Tokens whose
probability fell (``r < 1``) keep their full gradient, as in PPO with a positive advantage.

``p_old`` is the reference model (``requires = {"reference"}``):

- with ``model.reference_update: dft_lightning.reference.Snapshot`` (``every_n_steps: N``) it is a
  lagged snapshot of the policy, refreshed every N optimizer steps: the form this package offers.
  With ``N = 1`` the snapshot is the policy itself at every step, so ``r = 1`` and PSFT is SFT;
  take ``N > 1``.
- The original takes several optimizer steps on one batch with ``p_old`` fixed before the first;
  that inner loop is not offered here: it does not fit the step loop, where one loader item is one
  optimizer step (the step's token count normalises the loss, and the learning-rate schedule, the
  resumable step sampler and ``trainer.max_steps`` all count those steps).
- Without an update rule, ``p_old`` is the frozen starting model (a trust region around it).

Recommended: ``clip_low=0.2``, ``clip_high=0.28``. Logged: ``psft/ratio_mean``, ``psft/clipped_frac``
(tokens whose ratio is past ``1 + clip_high``, where the gradient stops).
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class PSFT(Objective):
    """Clipped-ratio SFT against ``p_old`` (the reference model).

    Args:
        clip_low: lower clip of the ratio (``1 - clip_low``).
        clip_high: upper clip of the ratio (``1 + clip_high``).
    """

    requires = frozenset({"reference"})

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.28) -> None:
        if not 0.0 <= clip_low < 1.0:
            raise ValueError(f"PSFT.clip_low must be in [0, 1), got {clip_low}")
        if clip_high < 0.0:
            raise ValueError(f"PSFT.clip_high must be zero or more, got {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.ref_logp is None:
            raise ValueError("PSFT needs the reference log-probs (TokenStats.ref_logp is None)")
        log_ratio = stats.logp - stats.ref_logp.detach().to(stats.logp.dtype)
        log_ratio = torch.where(stats.mask, log_ratio, torch.zeros_like(log_ratio))  # masked: r = 1, no inf
        ratio = torch.exp(log_ratio)
        clipped = ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
        surrogate = torch.minimum(ratio, clipped)
        return ObjectiveOutput(
            loss=stats.token_sum(-surrogate),
            metrics={"psft/ratio_mean": stats.token_mean(ratio.detach()),
                     "psft/clipped_frac": stats.token_mean((ratio.detach() > 1.0 + self.clip_high).to(ratio.dtype))},
        )
