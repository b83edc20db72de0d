"""The objective interface: per-token statistics in, a loss and diagnostics out.

An objective is a plain class. It never sees logits: the module computes the statistics an
objective declares in ``requires`` (chunked over the sequence, see ``dft_lightning.tokens``) and
hands them over as a :class:`TokenStats`. This keeps every objective on the memory-lean path and
makes a new objective a few lines of torch.

Normalisation contract: ``TokenStats.num_tokens`` is the number of supervised tokens in the whole
optimizer step (all micro-batches, all data-parallel ranks). An objective divides its summed
per-token loss by it (``TokenStats.token_sum``), so the gradients of the micro-batches of one step
add up to the gradient of the step's mean loss, whatever the micro-batch size, accumulation or
number of GPUs.

Metric contract: ``ObjectiveOutput.metrics`` holds scalars for this micro-batch, each a mean over
its supervised tokens; the module averages them over micro-batches and ranks weighted by
supervised tokens. Keys ending in ``_max`` / ``_min`` are reduced by max / min instead. Return the
same keys on every call (ranks reduce them together).

Pairwise objectives (``DPO``) see ``TokenStats.pairs``, the chosen and rejected sequence of each pair of
this micro-batch, and ``num_pairs``, the pairs of the whole step: ``pair_sum`` divides by it (the step's
mean over pairs), and ``pair_mean`` gives a per-pair metric that the token-weighted reduction turns into
the step's mean over pairs.

Checkpoints record the objective (``objective_spec``: class path and constructor arguments, which
``Objective`` captures at construction) so that ``load_from_checkpoint``, ``validate`` and ``test``
rebuild it (``build_objective``) when nothing else names one.

Not handled here: computing the statistics (``dft_lightning.tokens``), reference models
(``dft_lightning.module``, ``dft_lightning.reference``), logging.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dft_lightning.tokens import STATISTICS

#: The built-in requirements at import time; statistics registered later with
#: ``dft_lightning.tokens.register_statistic`` are in ``known_requirements()``, which the module checks.
KNOWN_REQUIREMENTS = frozenset({"reference", *STATISTICS})


def known_requirements() -> frozenset[str]:
    """``"reference"`` and every registered statistic (``dft_lightning.tokens.STATISTICS``)."""
    return frozenset({"reference", *STATISTICS})


@dataclass
class TokenStats:
    """Per-token statistics of one micro-batch; tensors are ``[batch, time]`` unless noted.

    Attributes:
        logp: log-probability of each target token under the policy (differentiable).
        mask: bool, True where the target token is supervised (assistant tokens, not prompt/pad).
        sequence: int, index of the sequence each token belongs to within the micro-batch
            (``-1`` for padding); several sequences share a row when rows are packed.
        num_tokens: scalar, supervised tokens in the whole optimizer step, all ranks.
        ref_logp: log-probability under the reference model (no gradient), when requested.
        entropy: entropy of the policy's next-token distribution (differentiable), when requested.
        targets: int, the target token ids (``-100`` where not supervised).
        extra: every other requested statistic by name (``dft_lightning.tokens.STATISTICS``), also
            readable as an attribute (``stats.topk_entropy``).
        pairs: pairwise data only: ``[num_pairs, 2]``, the ``sequence`` ids of each pair's chosen and
            rejected response in this micro-batch (``MicroBatch.pairs``).
        num_pairs: scalar, pairs in the whole optimizer step, all ranks (``None``: this micro-batch's pairs).
    """

    logp: Tensor
    mask: Tensor
    sequence: Tensor
    num_tokens: Tensor
    ref_logp: Tensor | None = None
    entropy: Tensor | None = None
    targets: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    pairs: Tensor | None = None
    num_pairs: Tensor | None = None

    def __getattr__(self, name: str) -> Tensor:
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"TokenStats has no {name!r}" + (
            " (a statistic: add it to the objective's requires)" if name in STATISTICS else ""))

    def token_sum(self, per_token: Tensor) -> Tensor:
        """Sum ``per_token`` over supervised tokens and divide by the step's token count.

        Uses ``torch.where`` rather than a multiplication so that a non-finite value at a masked
        position (``0 * inf``) cannot turn the loss into NaN.
        """
        return torch.where(self.mask, per_token, torch.zeros_like(per_token)).sum() / self.num_tokens

    def token_mean(self, per_token: Tensor) -> Tensor:
        """Mean of ``per_token`` over this micro-batch's supervised tokens (for metrics)."""
        count = self.mask.sum().clamp_min(1)
        return torch.where(self.mask, per_token, torch.zeros_like(per_token)).sum() / count

    def num_sequences(self) -> int:
        """Number of sequences in this micro-batch (max sequence id + 1)."""
        return int(self.sequence.max().item()) + 1 if self.sequence.numel() else 0

    def sequence_sum(self, per_token: Tensor) -> Tensor:
        """Sum ``per_token`` over the supervised tokens of each sequence: ``[num_sequences]``."""
        n = self.num_sequences()
        valid = self.mask & (self.sequence >= 0)
        values = torch.where(valid, per_token, torch.zeros_like(per_token))
        index = torch.where(valid, self.sequence, torch.zeros_like(self.sequence))
        out = torch.zeros(n, dtype=per_token.dtype, device=per_token.device)
        return out.index_add(0, index.reshape(-1), values.reshape(-1))

    def sequence_token_counts(self) -> Tensor:
        """Supervised tokens in each sequence: ``[num_sequences]`` (in ``logp``'s dtype)."""
        return self.sequence_sum(torch.ones_like(self.logp))

    def nll(self) -> Tensor:
        """Plain negative log-likelihood per token (``-logp``)."""
        return -self.logp

    def _step_pairs(self) -> Tensor:
        if self.pairs is None:
            raise ValueError("TokenStats.pairs is None: this objective needs pairwise data "
                             "(data.class_path: dft_lightning.data.PairDataModule)")
        if self.num_pairs is not None:
            return torch.as_tensor(self.num_pairs, dtype=self.logp.dtype, device=self.logp.device).clamp_min(1)
        return torch.tensor(float(max(self.pairs.shape[0], 1)), dtype=self.logp.dtype, device=self.logp.device)

    def pair_sum(self, per_pair: Tensor) -> Tensor:
        """Sum ``per_pair`` (``[num_pairs]``, this micro-batch's pairs) and divide by the step's pair count:
        the loss of a pairwise objective (its micro-batches add up to the step's mean over pairs)."""
        return per_pair.sum() / self._step_pairs()

    def pair_mean(self, per_pair: Tensor) -> Tensor:
        """A per-pair metric of this micro-batch, scaled so that the module's token-weighted reduction over
        micro-batches and ranks yields the step's mean over pairs (with ``num_pairs`` unset: this
        micro-batch's mean over its pairs)."""
        per_pair = per_pair.detach().to(self.logp.dtype)
        tokens = self.mask.sum().to(per_pair.dtype)
        if self.num_pairs is None or not bool(tokens > 0):
            return per_pair.sum() / max(per_pair.numel(), 1)
        scale = torch.as_tensor(self.num_tokens, dtype=per_pair.dtype, device=per_pair.device) / tokens
        return per_pair.sum() / self._step_pairs() * scale


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    Attributes:
        loss: the scalar that ``backward()`` sees (already normalised by ``num_tokens``).
        metrics: per-micro-batch diagnostics (see the module docstring for how they reduce).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class of training objectives.

    Subclasses set ``requires`` to the extra statistics they need (``"reference"`` or names in
    ``dft_lightning.tokens.STATISTICS``) and implement ``__call__``. Constructor arguments become YAML keys under
    ``model.objective.init_args``. Any class with this shape works, also one defined outside the
    package: name it by its import path in ``model.objective.class_path``.
    """

    requires: frozenset[str] = frozenset()
    #: Options of required statistics, e.g. ``{"topk_entropy": {"k": 20}}`` (see ``dft_lightning.tokens``).
    statistic_options: dict[str, dict[str, Any]] = {}

    def setup(self, tokenizer: Any) -> None:
        """Called once with the tokenizer before the first step (e.g. to build a per-vocabulary table)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Objective:
        self = super().__new__(cls)
        self._init_args = _bound_arguments(cls, args, kwargs)  # what objective_spec saves in checkpoints
        return self

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _bound_arguments(cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Constructor arguments by name, defaults filled in; ``None`` when they cannot be named."""
    try:
        bound = inspect.signature(cls).bind(*args, **kwargs)
    except (TypeError, ValueError):  # e.g. unpickling calls __new__ without arguments; __dict__ follows
        return None
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def objective_spec(objective: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of an objective (``init_args`` is ``None`` when unknown).

    ``Objective`` subclasses record their constructor arguments; for other classes of the same
    shape, constructor parameters are read back from attributes of the same name.
    """
    cls = type(objective)
    init_args = getattr(objective, "_init_args", None)
    if init_args is None and not isinstance(objective, Objective):
        try:
            params = [p for p in inspect.signature(cls).parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = None
        if params is not None and all(hasattr(objective, p.name) for p in params):
            init_args = {p.name: getattr(objective, p.name) for p in params}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": dict(init_args) if init_args is not None else None}


def build_objective(spec: dict[str, Any]) -> Any:
    """The objective that ``spec`` (from ``objective_spec``) describes."""
    from dft_lightning.errors import UserError

    class_path = spec.get("class_path", "")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"the checkpoint's objective {class_path} cannot be imported ({e}); put its module on "
                        "PYTHONPATH or name one with model.objective") from None
    if spec.get("init_args") is None:
        raise UserError(f"the checkpoint records objective {class_path} without its constructor arguments; name it "
                        "with model.objective (and its init_args)")
    return cls(**spec["init_args"])
