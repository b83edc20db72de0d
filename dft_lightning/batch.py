"""``MicroBatch``: the one typed object that travels from the collators to the model wrapper.

Collators (``dft_lightning.data.batching``, ``dft_lightning.data.vision``) build it, the module
moves it to the device (Lightning moves dataclass fields) and ``CausalLMWithTokenStats`` consumes
it; nothing in between picks keys out of a dict. Record boundaries of packed rows travel as
``segments`` (each row's run lengths: one per record, plus the row's trailing padding as a run of
its own), from which ``dft_lightning.attention.decoder_inputs`` gives every attention backend what
it needs (varlen kernels: ``cu_seqlens``; ``sdpa``: the spans; ``eager``: a mask).

``MicroBatch.no_op`` builds the two-token micro-batch with nothing supervised that keeps ranks in
lock-step when a packed step gives them different numbers of rows.

Precomputed reference log-probs (``model.reference: precomputed:<file>``, ``dft_lightning.precomputed``)
travel as ``ref_logp``, aligned with ``labels``: the value at ``[i, j]`` is the reference's log-prob of
the target ``labels[i, j]``, zero where nothing is supervised.

Pairwise data (``dft_lightning.data.pairs``: a preferred and a dispreferred response to one prompt) travels
as ``pairs``: ``[num_pairs, 2]`` sequence ids, ``(chosen, rejected)`` per pair, both in this micro-batch.

Not handled here: packing of image rows (the vision collator pads; ``data.packing`` raises there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """One forward/backward pass worth of rows; tensors are ``[rows, time]`` unless noted.

    Attributes:
        input_ids: token ids (padding: the pad id).
        labels: next-token targets at each position's own index (``IGNORE_INDEX`` where unsupervised);
            the model predicts ``labels[:, 1:]`` from positions ``:-1``.
        attention_mask: 1 on real tokens, 0 on padding.
        sequence_ids: the record each token belongs to, numbered across the micro-batch (``-1``: padding).
        position_ids: rotary positions (restarting at every packed record); ``None`` lets the model
            build its own (Qwen2.5-VL's 3-D positions for image tokens).
        segments: packed rows only: each row's run lengths, covering the row exactly.
        row_ids: the source row id of each record (``None`` for masked filler rows).
        extra_inputs: further decoder inputs (``pixel_values``, ``image_grid_thw``, ...).
        ref_logp: float32 precomputed reference log-probs of the targets, aligned with ``labels``
            (``None`` unless the rows carry them).
        pairs: pairwise data only: ``[num_pairs, 2]`` long, the ``sequence_ids`` of each pair's chosen and
            rejected record (``None`` for other data; masked filler records are in no pair).
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    sequence_ids: Tensor
    position_ids: Tensor | None = None
    segments: list[list[int]] | None = None
    row_ids: list[Any] = field(default_factory=list)
    extra_inputs: dict[str, Tensor] = field(default_factory=dict)
    ref_logp: Tensor | None = None
    pairs: Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        for name in ("labels", "attention_mask", "sequence_ids", "position_ids", "ref_logp"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"MicroBatch.{name} has shape {tuple(value.shape)}, input_ids {shape}")
        if self.segments is not None:
            if len(self.segments) != shape[0] or any(sum(row) != shape[1] for row in self.segments):
                raise ValueError(f"MicroBatch.segments {self.segments} do not cover rows of shape {shape}")
        if self.pairs is not None and (self.pairs.ndim != 2 or self.pairs.shape[1] != 2):
            raise ValueError(f"MicroBatch.pairs has shape {tuple(self.pairs.shape)}, expected [num_pairs, 2]")

    @property
    def packed(self) -> bool:
        """Several records share a row (attention must stay inside each one)."""
        return self.segments is not None

    @property
    def target_mask(self) -> Tensor:
        """``[rows, time - 1]`` bool: the supervised next-token targets."""
        return self.labels[:, 1:] != IGNORE_INDEX

    def supervised_tokens(self) -> int:
        return int(self.target_mask.sum())

    def num_pairs(self) -> int:
        """Chosen/rejected pairs in this micro-batch (0 for data that is not pairwise)."""
        return 0 if self.pairs is None else int(self.pairs.shape[0])

    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def padded_tokens(self) -> int:
        return self.attention_mask.numel()

    def cu_seqlens(self) -> tuple[Tensor, int]:
        """Cumulative run lengths over the flattened rows (int32, on the batch's device) and the longest run."""
        if self.segments is None:
            raise ValueError("cu_seqlens of a micro-batch that is not packed")
        lengths = [n for row in self.segments for n in row]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        return cu.to(self.input_ids.device), max(lengths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        """A copy on ``device`` (Lightning's batch transfer calls this)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return MicroBatch(
            input_ids=move(self.input_ids), labels=move(self.labels), attention_mask=move(self.attention_mask),
            sequence_ids=move(self.sequence_ids), position_ids=move(self.position_ids), segments=self.segments,
            row_ids=self.row_ids, extra_inputs={k: move(v) for k, v in self.extra_inputs.items()},
            ref_logp=move(self.ref_logp), pairs=move(self.pairs),
        )

    @classmethod
    def no_op(cls, like: MicroBatch) -> MicroBatch:
        """Two tokens, nothing supervised: a pass that changes no gradient (taken from ``like``'s first row)."""
        ids = like.input_ids[:1, :2].clone()
        return cls(
            input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), attention_mask=torch.ones_like(ids),
            sequence_ids=torch.zeros_like(ids), position_ids=torch.arange(2, device=ids.device)[None].clone(),
            segments=[[2]] if like.packed else None, row_ids=[None],
            ref_logp=None if like.ref_logp is None else torch.zeros(ids.shape, device=ids.device),
            pairs=None if like.pairs is None else torch.zeros((0, 2), dtype=torch.long, device=ids.device),
        )
