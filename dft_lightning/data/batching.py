"""Optimizer-step batches: each loader item is this rank's share of one global batch, as micro-batches.

``StepBatchSampler`` draws ``global_batch_size`` rows per optimizer step (shuffled per epoch with a
seed), gives every data-parallel rank an equal share, and ``collate_steps`` splits a share into
micro-batches of at most ``micro_batch_size`` rows, grouped by length within the step so padding
stays low. Because one loader item is one optimizer step, the module knows the step's supervised
token count before the first backward and normalises the loss exactly (see
``dft_lightning.objectives.base``). Padded steps give every rank the same number of micro-batches;
packed steps may not (records pack differently), and the module pads the shorter ranks with
no-op micro-batches (``MicroBatch.no_op``).

For evaluation (``drop_last=False``) the last step is filled up with masked repeats of real rows
(their labels are all ignored), so ranks stay in lock-step without counting any row twice.

Micro-batches are ``dft_lightning.batch.MicroBatch`` objects. With packing (``PackedStepCollator``),
a step's records are packed first-fit-decreasing into rows of at most ``pack_length`` tokens;
position ids restart at every record, ``sequence_ids`` name the record of each token and
``segments`` hold each row's record lengths, from which ``dft_lightning.attention.decoder_inputs``
keeps attention inside each record on every backend. The first token of every record is never a
target.

Rows that carry precomputed reference log-probs (``"ref_logp"``: one float per supervised target of
``labels[1:]``, attached by ``dft_lightning.precomputed``) get them placed into ``MicroBatch.ref_logp``
at their targets' positions, padded and packed alike.

Not handled here: packing across optimizer steps (a step's records stay in that step).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dft_lightning.batch import IGNORE_INDEX, MicroBatch


class StepBatchSampler:
    """Yields, per optimizer step, the row indices of this rank's share (negative = masked filler)."""

    def __init__(
        self, num_rows: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
        seed: int = 0, drop_last: bool = True,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by {world_size} data-parallel ranks")
        self.num_rows, self.global_batch_size = num_rows, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.skip_steps = 0
        # Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, step_in_epoch: int) -> None:
        """Skip the first ``step_in_epoch`` steps of the next pass (resuming a mid-epoch checkpoint)."""
        self.skip_steps = max(0, step_in_epoch)

    def __len__(self) -> int:
        steps = self.num_rows / self.global_batch_size
        return math.floor(steps) if self.drop_last else math.ceil(steps)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        share = self.global_batch_size // self.world_size
        skip, self.skip_steps = self.skip_steps, 0
        for step in range(skip, len(self)):
            rows = order[step * self.global_batch_size : (step + 1) * self.global_batch_size]
            mine = rows[self.rank :: self.world_size]
            # Filler rows keep every rank at the same number of micro-batches; their labels are masked.
            filler = [-(rows[i % len(rows)] + 1) for i in range(share - len(mine))]
            yield mine + filler


class StepDataset(torch.utils.data.Dataset):
    """Tokenised rows; a negative index ``-(i + 1)`` returns row ``i`` with every label masked."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= 0:
            return self.rows[index]
        row = self.rows[-index - 1]
        return {**row, "labels": [IGNORE_INDEX] * len(row["labels"]), "row_id": None}


def _reference_rows(rows: Sequence[dict[str, Any]], shape: tuple[int, int]) -> torch.Tensor | None:
    """A zero ``ref_logp`` tensor when the rows carry precomputed reference log-probs (all or none of them)."""
    carrying = ["ref_logp" in r for r in rows]
    if not any(carrying):
        return None
    if not all(carrying):
        missing = [r.get("row_id") for r in rows if "ref_logp" not in r][:3]
        raise ValueError(f"rows {missing} have no precomputed reference log-probs, others in their micro-batch do")
    return torch.zeros(shape, dtype=torch.float32)


def _place_reference(ref: torch.Tensor, i: int, start: int, row: dict[str, Any], labels: torch.Tensor) -> None:
    """Write ``row``'s precomputed values at its supervised targets (``labels[1:]``), from column ``start``."""
    targets = labels[1:] != IGNORE_INDEX
    if not bool(targets.any()):  # a masked filler row: nothing is read
        return
    values = torch.as_tensor(row["ref_logp"], dtype=torch.float32)
    if values.numel() != int(targets.sum()):
        raise ValueError(f"row {row.get('row_id')}: {values.numel()} precomputed reference log-probs for "
                         f"{int(targets.sum())} supervised targets")
    n = len(labels)
    ref[i, start + 1 : start + n][targets] = values


def pad_rows(rows: Sequence[dict[str, Any]], pad_id: int, *, positions: bool = True) -> MicroBatch:
    """Right-pad rows into one micro-batch; ``positions=False`` leaves the position ids to the model."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = len(rows)
    ref = _reference_rows(rows, (batch, width))
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    sequence = torch.full((batch, width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention[i, :n] = 1
        sequence[i, :n] = i
        if ref is not None:
            _place_reference(ref, i, 0, r, labels[i, :n])
    return MicroBatch(
        input_ids=input_ids, labels=labels, attention_mask=attention, sequence_ids=sequence,
        position_ids=torch.arange(width).expand(batch, width).clone() if positions else None,
        row_ids=[r.get("row_id") for r in rows], ref_logp=ref,
    )


def pack_records(rows: Sequence[dict[str, Any]], capacity: int) -> list[list[dict[str, Any]]]:
    """First-fit-decreasing bin packing of records into rows of at most ``capacity`` tokens."""
    bins: list[list[dict[str, Any]]] = []
    free: list[int] = []
    for row in sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True):
        n = len(row["input_ids"])
        if n > capacity:
            raise ValueError(f"record {row.get('row_id')} has {n} tokens, more than data.pack_length={capacity}")
        for i, space in enumerate(free):
            if n <= space:
                bins[i].append(row)
                free[i] -= n
                break
        else:
            bins.append([row])
            free.append(capacity - n)
    return bins


def pad_packed(bins: Sequence[Sequence[dict[str, Any]]], pad_id: int) -> MicroBatch:
    """Rows of packed records -> one micro-batch; ``sequence_ids`` number the records across it."""
    width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    batch = len(bins)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    sequence = torch.full((batch, width), -1, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    ref = _reference_rows([r for b in bins for r in b], (batch, width))
    row_ids, segments, record = [], [], 0
    for i, b in enumerate(bins):
        start, runs = 0, []
        for r in b:
            n = len(r["input_ids"])
            input_ids[i, start : start + n] = torch.tensor(r["input_ids"])
            labels[i, start : start + n] = torch.tensor(r["labels"])
            if ref is not None:  # the record's own targets, labels[1:]: the first is never one
                _place_reference(ref, i, start, r, labels[i, start : start + n])
            labels[i, start] = IGNORE_INDEX  # never predicted from the previous record's last token
            attention[i, start : start + n] = 1
            sequence[i, start : start + n] = record
            positions[i, start : start + n] = torch.arange(n)
            row_ids.append(r.get("row_id"))
            runs.append(n)
            record += 1
            start += n
        positions[i, start:] = torch.arange(width - start)
        segments.append(runs + ([width - start] if start < width else []))  # the padding: a run of its own
    return MicroBatch(
        input_ids=input_ids, labels=labels, attention_mask=attention, sequence_ids=sequence,
        position_ids=positions, segments=segments, row_ids=row_ids, ref_logp=ref,
    )


class StepCollator:
    """Turns one step's rows into a list of padded micro-batches, grouped by length."""

    def __init__(self, micro_batch_size: int, pad_id: int) -> None:
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> list[MicroBatch]:
        ordered = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)
        size = self.micro_batch_size
        return [pad_rows(ordered[i : i + size], self.pad_id) for i in range(0, len(ordered), size)]


class PackedStepCollator:
    """Packs one step's records into rows of ``pack_length`` tokens, ``micro_batch_size`` rows per micro-batch."""

    def __init__(self, micro_batch_size: int, pad_id: int, pack_length: int) -> None:
        self.micro_batch_size, self.pad_id, self.pack_length = micro_batch_size, pad_id, pack_length

    def __call__(self, rows: list[dict[str, Any]]) -> list[MicroBatch]:
        bins = pack_records(rows, self.pack_length)
        size = self.micro_batch_size
        return [pad_packed(bins[i : i + size], self.pad_id) for i in range(0, len(bins), size)]


def padding_efficiency(micro_batches: Sequence[MicroBatch]) -> float:
    """Real tokens / (rows x padded width) over a step's micro-batches."""
    real = sum(mb.real_tokens() for mb in micro_batches)
    total = sum(mb.padded_tokens() for mb in micro_batches)
    return real / max(total, 1)
