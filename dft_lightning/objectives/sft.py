"""Supervised fine-tuning: mean cross-entropy over supervised tokens."""

from __future__ import annotations

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class SFT(Objective):
    """``-log p_t`` averaged over the supervised tokens of the optimizer step."""

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        return ObjectiveOutput(loss=stats.token_sum(stats.nll()))
