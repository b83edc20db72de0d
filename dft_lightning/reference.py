"""Reference models that move: an EMA of the policy, or a snapshot of it refreshed every N steps.

A reference model starts as the frozen starting model (or ``model.reference``, another model) and,
with ``model.reference_update``, follows the policy after optimizer steps:

- ``EMA(decay=0.99)``: ``ref <- decay * ref + (1 - decay) * policy`` after every ``every_n_steps``
  optimizer steps;
- ``Snapshot(every_n_steps=1)``: ``ref <- policy`` every ``every_n_steps`` optimizer steps, the
  lagged ``p_old`` of proximal objectives (``PSFT``): between refreshes the policy moves away
  from the snapshot.

Parameters are paired by name and updated in place, shard by shard under FSDP2 (the reference is
sharded like the policy). The module saves the reference's weights in checkpoints when an update
rule is set, so a resumed run continues from the same reference: in a sharded (distributed)
checkpoint as shards of the distributed state dict under ``REFERENCE_PREFIX`` beside the policy's
(``sharded_state_dict``, read back by ``load_shards``: every rank reads its own shards), in a
one-file checkpoint as a full state dict in the module's metadata.

Not handled here: LoRA policies (their reference is the base model with adapters off, which does
not move), references precomputed with the tokenised rows (``dft_lightning.precomputed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Key prefix of the reference's shards in a distributed checkpoint's ``state_dict``.
REFERENCE_PREFIX = "_reference."


def paired_parameters(reference: nn.Module, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(reference, policy)`` parameter pairs by name; a structural mismatch is an error naming the tensors."""
    ref = dict(reference.named_parameters())
    pol = dict(policy.named_parameters())
    if ref.keys() != pol.keys():
        missing, extra = sorted(pol.keys() - ref.keys())[:3], sorted(ref.keys() - pol.keys())[:3]
        raise ValueError(f"the reference model does not match the policy (only in the policy: {missing}; only in "
                         f"the reference: {extra}); model.reference_update needs the same architecture")
    return [(ref[name], pol[name]) for name in ref]


class ReferenceUpdate:
    """How the reference follows the policy; ``every_n_steps`` optimizer steps apart."""

    def __init__(self, every_n_steps: int = 1) -> None:
        if int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps must be a positive integer, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)

    def due(self, steps_taken: int) -> bool:
        """Whether to update after the optimizer step that made ``steps_taken`` steps in all."""
        return steps_taken > 0 and steps_taken % self.every_n_steps == 0

    @torch.no_grad()
    def update(self, reference: nn.Module, policy: nn.Module) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class EMA(ReferenceUpdate):
    """Exponential moving average of the policy: ``ref <- decay * ref + (1 - decay) * policy``.

    Args:
        decay: weight of the old reference (``0`` copies the policy, like ``Snapshot``).
        every_n_steps: update after every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.99, every_n_steps: int = 1) -> None:
        super().__init__(every_n_steps)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA.decay must be in [0, 1), got {decay}")
        self.decay = decay

    @torch.no_grad()
    def update(self, reference: nn.Module, policy: nn.Module) -> None:
        for ref, pol in paired_parameters(reference, policy):
            ref.lerp_(pol.detach().to(ref.dtype), 1.0 - self.decay)


class Snapshot(ReferenceUpdate):
    """A copy of the policy, refreshed every ``every_n_steps`` optimizer steps (PSFT's ``p_old``)."""

    @torch.no_grad()
    def update(self, reference: nn.Module, policy: nn.Module) -> None:
        for ref, pol in paired_parameters(reference, policy):
            ref.copy_(pol.detach())


def is_sharded(state_dict: Any) -> bool:
    """Whether a checkpoint's ``state_dict`` holds shards (``DTensor``s: FSDP2 with a distributed checkpoint)."""
    from torch.distributed.tensor import DTensor

    return isinstance(state_dict, dict) and any(isinstance(v, DTensor) for v in state_dict.values())


def sharded_state_dict(reference: nn.Module) -> dict[str, Any]:
    """The FSDP2-sharded reference's state dict as shards (on CPU), keys under ``REFERENCE_PREFIX``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(reference, options=StateDictOptions(cpu_offload=True))
    return {REFERENCE_PREFIX + k: v for k, v in state.items()}


def load_shards(reference: nn.Module, path: str | Path) -> None:
    """Read this rank's shards of the reference from the distributed checkpoint at ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    template = get_model_state_dict(reference)
    wrapped = {"state_dict": {REFERENCE_PREFIX + k: v for k, v in template.items()}}
    dcp.load(wrapped, checkpoint_id=str(path))
    set_model_state_dict(reference, {k[len(REFERENCE_PREFIX):]: v for k, v in wrapped["state_dict"].items()})
