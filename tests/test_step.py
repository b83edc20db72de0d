"""Step accounting without a Trainer: token counts, metric reduction across ranks, the non-finite policy."""

from __future__ import annotations

import pytest
import torch

from dft_lightning.batch import MicroBatch
from dft_lightning.data.batching import pad_rows
from dft_lightning.objectives import TokenStats
from dft_lightning.step import NonFinitePolicy, StepMetrics, TokenStatsHook, detached, supervised_counts


def micro(lengths: list[int], supervised_from: int = 1) -> MicroBatch:
    rows = [{"input_ids": list(range(n)), "labels": [-100] * supervised_from + list(range(supervised_from, n)),
             "row_id": str(n)} for n in lengths]
    return pad_rows(rows, pad_id=0)


def test_supervised_counts_count_next_token_targets():
    # a row of n tokens supervised from index s has n - s targets (the first token is never a target)
    counts = supervised_counts([micro([5, 3]), micro([4], supervised_from=2)])
    assert counts.tolist() == [4.0 + 2.0, 2.0]


def record_reduce(log: list[tuple[torch.Tensor, str]]):
    def reduce(values: torch.Tensor, op: str) -> torch.Tensor:
        log.append((values.clone(), op))
        return values
    return reduce


def two_rank_reduce(other_calls: list[tuple[torch.Tensor, str]]):
    """all_reduce as two ranks would see it: combine with the other rank's value of the same call."""
    calls = list(other_calls)

    def reduce(values: torch.Tensor, op: str) -> torch.Tensor:
        theirs, their_op = calls.pop(0)
        assert their_op == op
        return {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op](values, theirs)
    return reduce


def test_metrics_weight_by_token_share_and_reduce_extremes_across_ranks():
    ranks = []
    for rank_values in ([(3.0, 0.5, 2.0, 9.0), (1.0, 0.25, 7.0, 1.0)], [(4.0, 1.0, 5.0, 0.5)]):
        metrics = StepMetrics()
        for share_tokens, weight, hi, lo in rank_values:
            share = torch.tensor(share_tokens / 8.0)  # 8 supervised tokens in the whole step
            metrics.add("train/loss", torch.tensor(share_tokens))
            metrics.add_objective({"w/mean": torch.tensor(weight), "w/top_max": torch.tensor(hi),
                                   "w/low_min": torch.tensor(lo)}, share)
        ranks.append(metrics)
    assert ranks[0].keys() == ["train/loss", "w/mean", "w/low_min", "w/top_max"]
    log: list = []
    ranks[1].reduce(record_reduce(log))
    out = ranks[0].reduce(two_rank_reduce(log))
    assert out["train/loss"].item() == pytest.approx(8.0)
    # token-weighted mean over both ranks' micro-batches: (3 * .5 + 1 * .25 + 4 * 1) / 8
    assert out["w/mean"].item() == pytest.approx((3 * 0.5 + 1 * 0.25 + 4 * 1.0) / 8)
    assert out["w/top_max"].item() == 7.0 and out["w/low_min"].item() == 0.5


def test_nonfinite_policy_raises_skips_counts_and_stops_after_too_many():
    with pytest.raises(FloatingPointError, match="non-finite loss nan .* at step 3.*on_nonfinite=skip"):
        NonFinitePolicy("raise").admit(float("nan"), 1.0, "step 3")
    warnings: list[str] = []
    policy = NonFinitePolicy("skip", max_consecutive=3)
    assert policy.admit(1.0, 2.0, "step 0", warn=warnings.append)
    assert not policy.admit(1.0, float("inf"), "step 1", warn=warnings.append)
    assert not policy.admit(float("nan"), 1.0, "step 2", warn=warnings.append)
    assert policy.admit(1.0, 1.0, "step 3") and policy.consecutive == 0 and policy.skipped == 2
    assert len(warnings) == 2 and "step 1" in warnings[0]
    restored = NonFinitePolicy("skip", max_consecutive=3)
    restored.load_state_dict(policy.state_dict())
    assert restored.skipped == 2
    policy.admit(float("nan"), 1.0, "step 4", warn=warnings.append)
    policy.admit(float("nan"), 1.0, "step 5", warn=warnings.append)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps; last: .* at step 6"):
        policy.admit(float("nan"), 1.0, "step 6", warn=warnings.append)
    with pytest.raises(ValueError, match="'raise' or 'skip'"):
        NonFinitePolicy("ignore")


def test_hook_protocol_and_detached_statistics():
    class Seen:
        def on_train_token_stats(self, trainer, pl_module, batch, stats) -> None: ...

    assert isinstance(Seen(), TokenStatsHook) and not isinstance(object(), TokenStatsHook)
    logp = torch.randn(2, 3, requires_grad=True)
    stats = TokenStats(logp=logp * 2, mask=torch.ones(2, 3, dtype=torch.bool), sequence=torch.zeros(2, 3),
                       num_tokens=torch.tensor(6.0))
    plain = detached(stats)
    assert not plain.logp.requires_grad and torch.equal(plain.logp, stats.logp) and plain.ref_logp is None
