"""Sequence-level DFT: each response's summed NLL weighted by its own detached probability.

The DFT paper derives its token-level objective from the sequence-level one (eq. 8): the
importance weight that turns the SFT gradient into a policy gradient is the probability of the
whole response, ``sg(pi(y | x)) = sg(exp(sum_t log p_t))``. This class trains with that weight so
the two can be compared; ``length_normalised`` swaps it for the geometric mean of the token
probabilities, ``sg(exp(mean_t log p_t))``.

Not handled here: the token-level objective that the paper trains with (``DFT``).
"""

from __future__ import annotations

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class DFTSequence(Objective):
    """``w_s * sum_{t in s} -log p_t`` per sequence ``s``, summed and divided by the step's token count.

    ``w_s = sg(exp(sum_t log p_t))`` (paper eq. 8), or ``sg(exp(mean_t log p_t))`` with
    ``length_normalised``.

    Source: Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
    Reward Rectification" (2025), eq. 8, which the paper states but does not train with.

    Numerically eq. 8 is fragile: a response's log-probability is a sum over its tokens, so it
    grows linearly with the length. At 0.5 nats per token a 300-token response has weight
    ``exp(-150) ~ 1e-65``, and past about 104 nats (float32) or 745 nats (float64) ``exp`` underflows
    to exactly 0: long responses stop contributing at all, and across a batch the weights span
    hundreds of orders of magnitude, so the step is driven by the shortest, most likely responses.
    ``dft_seq/underflow_frac`` logs the share of tokens in sequences whose weight is 0.
    Recommended: ``length_normalised=True`` (weights in ``(0, 1]``, comparable across lengths) unless
    reproducing eq. 8 itself on short responses.

    Args:
        length_normalised: weight by the geometric-mean token probability instead of the
            sequence probability.

    Logged (token-weighted over sequences): ``dft_seq/weight_mean``, ``dft_seq/underflow_frac``,
    ``dft_seq/weight_max``, ``dft_seq/weight_min``.
    """

    def __init__(self, length_normalised: bool = False) -> None:
        if not isinstance(length_normalised, bool):
            raise ValueError(f"DFTSequence.length_normalised must be true or false, got {length_normalised!r}")
        self.length_normalised = length_normalised

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        counts = stats.sequence_token_counts()
        present = counts > 0
        seq_logp = stats.sequence_sum(stats.logp.detach())
        if self.length_normalised:
            seq_logp = seq_logp / counts.clamp_min(1)
        weight = torch.exp(seq_logp)
        seq_nll = stats.sequence_sum(stats.nll())
        # A weight that underflowed to 0 contributes 0, also if the sequence's NLL is infinite.
        weighted = torch.where(weight > 0, weight * seq_nll, torch.zeros_like(seq_nll))
        loss = weighted.sum() / stats.num_tokens
        tokens = counts.sum().clamp_min(1)
        metrics = {
            "dft_seq/weight_mean": (weight * counts).sum() / tokens,
            "dft_seq/underflow_frac": ((weight == 0).to(counts.dtype) * counts).sum() / tokens,
        }
        # Always the same keys (ranks reduce them together); +-inf are the identities of max / min.
        inf = torch.tensor(float("inf"), dtype=weight.dtype, device=weight.device)
        metrics["dft_seq/weight_max"] = torch.where(present, weight, -inf).max() if weight.numel() else -inf
        metrics["dft_seq/weight_min"] = torch.where(present, weight, inf).min() if weight.numel() else inf
        return ObjectiveOutput(loss=loss, metrics=metrics)
