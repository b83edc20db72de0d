"""Step batches: equal rank shares, every row once per epoch, masked fillers, length grouping."""

from __future__ import annotations

import pytest
import torch

from dft_lightning.data.batching import StepBatchSampler, StepCollator, StepDataset


def test_ranks_get_disjoint_equal_shares_covering_each_step():
    samplers = [StepBatchSampler(50, 8, rank=r, world_size=2, seed=1) for r in range(2)]
    steps = [list(s) for s in samplers]
    assert len(steps[0]) == len(steps[1]) == 6  # drop_last: 50 // 8
    seen = []
    for a, b in zip(*steps, strict=True):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        seen += a + b
    assert len(set(seen)) == 48


def test_epochs_reshuffle_deterministically():
    s = StepBatchSampler(32, 8, seed=5)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first and second != first


def test_lightning_sets_the_epoch_and_resume_skips_taken_steps():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = StepBatchSampler(32, 8, seed=5)
    loader = DataLoader(list(range(32)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3
    full = list(sampler)
    sampler.resume_at(2)
    assert list(sampler) == full[2:]
    assert list(sampler) == full  # the skip applies to one pass only


def test_eval_fills_last_step_with_masked_rows():
    samplers = [StepBatchSampler(5, 4, rank=r, world_size=2, shuffle=False, drop_last=False) for r in range(2)]
    last = [list(s)[-1] for s in samplers]
    assert last[0] == [4, -5] and last[1] == [-5, -5]  # only row 4 is real in the last step
    data = StepDataset([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "row_id": f"r{i}"} for i in range(5)])
    assert data[-5]["labels"] == [-100, -100, -100] and data[-5]["row_id"] is None


def test_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="not divisible by 3"):
        StepBatchSampler(10, 8, world_size=3)


def test_collator_groups_by_length_and_pads():
    rows = [{"input_ids": list(range(n)), "labels": [-100] + list(range(1, n)), "row_id": str(n)} for n in (3, 9, 4, 8)]
    micro = StepCollator(micro_batch_size=2, pad_id=0)(rows)
    assert [mb.row_ids for mb in micro] == [["9", "8"], ["4", "3"]]
    assert micro[1].input_ids.shape == (2, 4)
    assert torch.equal(micro[1].attention_mask, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert torch.equal(micro[1].sequence_ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, -1]]))
    assert micro[1].labels[1, 3] == -100
