"""Direct preference optimisation (Rafailov et al., 2023): a pairwise loss against a frozen reference.

For each pair of one prompt's chosen and rejected response, with ``log pi(y|x)`` the summed log-prob of
the response tokens (the supervised ones) under the policy and ``log pi_ref(y|x)`` under the reference:

    r(y) = beta * (log pi(y|x) - log pi_ref(y|x))            (the implicit reward)
    loss = -(1 - eps) log sigmoid(r(chosen) - r(rejected)) - eps log sigmoid(r(rejected) - r(chosen))

(``eps``: ``label_smoothing``; 0 is the paper's loss). With the reference equal to the policy every
reward is 0 and the loss is ``log 2``.

Normalisation: the **mean over the step's pairs** (all micro-batches, all ranks: ``TokenStats.pair_sum``
divides by ``num_pairs``), not the per-token normalisation of the other objectives: a pair's loss is one
number whatever its length. Micro-batch size, accumulation and GPU count do not change the update.
In validation and test (``val/loss``) each micro-batch's mean over its pairs is weighted by its supervised
tokens, as the module weights every objective's evaluation loss.

Not handled here: the pairs themselves (``dft_lightning.data.pairs`` puts a pair's chosen and rejected
records in one micro-batch), the reference model (``dft_lightning.module``), other preference losses
(IPO, hinge, length-normalised variants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats


class DPO(Objective):
    """Sigmoid DPO loss over chosen/rejected pairs, with the frozen starting model as the reference.

    Source: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model" (2023), eq. 7; ``label_smoothing`` is the conservative DPO of Mitchell (2023). The DFT paper's
    Table 2 baseline trains it with lr 1e-6, batch 128 and warm-up ratio 0.05 (``beta`` not stated; 0.1
    is the usual value).

    Needs pairwise batches (``data.class_path: dft_lightning.data.PairDataModule``, which fills
    ``TokenStats.pairs``) and the reference model (``requires = {"reference"}``).

    Args:
        beta: temperature of the implicit reward (the strength of the pull towards the reference).
        label_smoothing: ``eps`` in [0, 0.5): the assumed share of flipped preference labels.

    Logged (means over the step's pairs): ``dpo/reward_margin`` (``r(chosen) - r(rejected)``),
    ``dpo/accuracy`` (share of pairs with ``r(chosen) > r(rejected)``), ``dpo/chosen_reward``,
    ``dpo/rejected_reward``.
    """

    requires = frozenset({"reference"})

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        if not beta > 0:
            raise ValueError(f"DPO.beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = beta
        self.label_smoothing = label_smoothing

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.ref_logp is None:
            raise ValueError("DPO needs reference log-probs (TokenStats.ref_logp is None)")
        if stats.pairs is None:
            raise ValueError("DPO needs pairwise batches (TokenStats.pairs is None): set data.class_path to "
                             "dft_lightning.data.PairDataModule")
        # Masked positions may hold -inf: select the supervised ones before any difference.
        zero = torch.zeros_like(stats.logp)
        policy = stats.sequence_sum(torch.where(stats.mask, stats.logp, zero))
        reference = stats.sequence_sum(torch.where(stats.mask, stats.ref_logp.to(stats.logp.dtype), zero))
        chosen, rejected = stats.pairs[:, 0], stats.pairs[:, 1]
        chosen_reward = self.beta * (policy[chosen] - reference[chosen])
        rejected_reward = self.beta * (policy[rejected] - reference[rejected])
        margin = chosen_reward - rejected_reward
        eps = self.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        metrics = {
            "dpo/reward_margin": stats.pair_mean(margin),
            "dpo/accuracy": stats.pair_mean((margin > 0).to(margin.dtype)),
            "dpo/chosen_reward": stats.pair_mean(chosen_reward),
            "dpo/rejected_reward": stats.pair_mean(rejected_reward),
        }
        return ObjectiveOutput(loss=stats.pair_sum(per_pair), metrics=metrics)
