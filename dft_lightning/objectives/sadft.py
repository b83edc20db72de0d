"""SADFT: semantic-aware DFT. The DFT weight ``sg(p)`` is raised to a power chosen by the target token's class.

Per supervised token: ``sg(p)^{s(token)} * (-log p)`` with

- ``s = numeric_weight`` (default 0.3) for tokens holding a digit,
- ``s = stopword_weight`` (default 1.0, plain DFT) for stopwords and punctuation,
- ``s = default_weight`` (default 0.7) for every other token.

An exponent below 1 flattens DFT's weight, so unlikely digits still learn (DFT's ``sg(p)`` barely
trains what starts unlikely, and wrong digits are what breaks a math answer); exponent 0 is SFT for
that class, 1 is DFT. The class of every vocabulary entry is decided once, from its decoded text,
when the module hands the tokenizer to ``setup``; ids the tokenizer does not know (padded
vocabularies) count as "other". These are the DFT authors' later variant's settings.

Logged: ``sadft/weight_mean`` and each class's share of the supervised tokens.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any

import torch

from dft_lightning.objectives.base import Objective, ObjectiveOutput, TokenStats

#: Common English function words (lower case); ``stopwords=`` replaces the list.
STOPWORDS = frozenset(
    "a an the and or but nor so yet if then else when while of in on at by for with from to into onto upon "
    "over under about above below between through during before after since until than as is are was were "
    "be been being am do does did has have had having it its this that these those there here which who whom "
    "whose what where why how not no all any each both either neither some such own same very can could "
    "will would shall should may might must we our you your he his she her they their them us i me my".split()
)
NUMERIC, STOPWORD, OTHER = 0, 1, 2


def token_class(text: str, stopwords: frozenset[str]) -> int:
    """``NUMERIC`` when the text holds a digit, ``STOPWORD`` for a stopword or punctuation only, else ``OTHER``."""
    if any(ch.isdigit() for ch in text):
        return NUMERIC
    word = text.strip()
    if word and (word.lower() in stopwords or all(ch in string.punctuation for ch in word)):
        return STOPWORD
    return OTHER


class SADFT(Objective):
    """DFT whose weight exponent follows the target token's class (digits, stopwords/punctuation, other).

    Args:
        numeric_weight: exponent of ``sg(p)`` for tokens holding a digit.
        stopword_weight: exponent for stopwords and punctuation.
        default_weight: exponent for all other tokens.
        stopwords: the stopword list (default: ``STOPWORDS``, common English function words).
    """

    def __init__(self, numeric_weight: float = 0.3, stopword_weight: float = 1.0, default_weight: float = 0.7,
                 stopwords: list[str] | None = None) -> None:
        for name, value in (("numeric_weight", numeric_weight), ("stopword_weight", stopword_weight),
                            ("default_weight", default_weight)):
            if value < 0:
                raise ValueError(f"SADFT.{name} must be zero or more, got {value}")
        self.numeric_weight, self.stopword_weight, self.default_weight = numeric_weight, stopword_weight, default_weight
        self.stopwords = stopwords
        self._classes: torch.Tensor | None = None  # [vocab] int8 class of each token id, from setup()

    def setup(self, tokenizer: Any) -> None:
        words = frozenset(w.lower() for w in self.stopwords) if self.stopwords is not None else STOPWORDS
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.set_classes(token_class(t, words) for t in texts)

    def set_classes(self, classes: Iterable[int]) -> None:
        """Each token id's class (``NUMERIC``, ``STOPWORD``, ``OTHER``), in id order."""
        self._classes = torch.tensor(list(classes), dtype=torch.long)

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        if self._classes is None:
            raise ValueError("SADFT has no token classes: the module calls setup(tokenizer) before training")
        if stats.targets is None:
            raise ValueError("SADFT needs the target ids (TokenStats.targets)")
        classes = self._classes.to(stats.targets.device)
        ids = stats.targets.clamp(0, classes.numel() - 1)
        known = (stats.targets >= 0) & (stats.targets < classes.numel())
        cls = torch.where(known, classes[ids], torch.full_like(ids, OTHER))
        exponents = torch.tensor([self.numeric_weight, self.stopword_weight, self.default_weight],
                                 dtype=stats.logp.dtype, device=stats.logp.device)[cls]
        weight = torch.exp(stats.logp.detach() * exponents)  # sg(p)^s, without forming p^s at p = 0
        weight = torch.where(stats.mask, weight, torch.zeros_like(weight))
        metrics = {"sadft/weight_mean": stats.token_mean(weight)}
        for name, value in (("numeric", NUMERIC), ("stopword", STOPWORD), ("other", OTHER)):
            metrics[f"sadft/{name}_share"] = stats.token_mean((cls == value).to(stats.logp.dtype))
        return ObjectiveOutput(loss=stats.token_sum(weight * stats.nll()), metrics=metrics)
