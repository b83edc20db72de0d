"""DPO: the loss and gradients against a direct full-logits implementation, the reference = policy limit, the
step's mean over pairs across micro-batches, and training on the tiny model through the CLI's parser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dft_lightning.objectives import DPO, TokenStats
from dft_lightning.step import StepMetrics
from dft_lightning.tokens import token_statistics

F32 = torch.float32
TOL = {"rtol": 1e-5, "atol": 1e-6}
# Four padded rows, one sequence each: pairs (0 chosen, 1 rejected) and (3 chosen, 2 rejected).
PAIRS = torch.tensor([[0, 1], [3, 2]])
LENGTHS = [7, 5, 9, 4]


def make_case(seed: int, vocab: int = 17, hidden: int = 8, same_reference: bool = False):
    g = torch.Generator().manual_seed(seed)
    batch, time = len(LENGTHS), max(LENGTHS)
    h = (torch.randn(batch, time, hidden, generator=g) * 0.5).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).requires_grad_()
    w_ref = w.detach().clone() if same_reference else w.detach() + 0.5 * torch.randn(vocab, hidden, generator=g)
    targets = torch.randint(0, vocab, (batch, time), generator=g)
    sequence = torch.arange(batch)[:, None].expand(batch, time).clone()
    for i, n in enumerate(LENGTHS):
        targets[i, n:] = -100
        sequence[i, n:] = -1
    targets[:, :2] = -100  # the prompt
    return h, w, w_ref, targets, sequence


def chunked_stats(h, w, w_ref, targets, sequence, pairs=PAIRS, num_pairs=None) -> TokenStats:
    logp = token_statistics(h, w, targets, chunk_size=5)[0]
    with torch.no_grad():
        ref_logp = token_statistics(h, w_ref, targets, chunk_size=5)[0]
    mask = targets != -100
    return TokenStats(logp=logp, mask=mask, sequence=sequence, num_tokens=mask.sum().to(logp.dtype),
                      ref_logp=ref_logp, targets=targets, pairs=pairs, num_pairs=num_pairs)


def direct_dpo(h, w, w_ref, targets, beta, label_smoothing):
    """From the formula: full [batch, time, vocab] logits, summed response log-probs, mean over pairs."""
    def sums(weight):
        log_probs = torch.log_softmax(h @ weight.T, dim=-1)
        picked = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (picked * (targets != -100)).sum(-1)

    policy, reference = sums(w), sums(w_ref).detach()
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[PAIRS[:, 0]], rewards[PAIRS[:, 1]]
    margin = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), {"dpo/reward_margin": margin.mean(), "dpo/accuracy": (margin > 0).float().mean(),
                           "dpo/chosen_reward": chosen.mean(), "dpo/rejected_reward": rejected.mean()}


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_loss_metrics_and_gradients_equal_a_full_logits_implementation(beta, label_smoothing):
    h, w, w_ref, targets, sequence = make_case(0)
    out = DPO(beta=beta, label_smoothing=label_smoothing)(chunked_stats(h, w, w_ref, targets, sequence))
    grads = torch.autograd.grad(out.loss, (h, w))
    loss, metrics = direct_dpo(h, w, w_ref, targets, beta, label_smoothing)
    expected = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(out.loss, loss, **TOL)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert out.metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        torch.testing.assert_close(out.metrics[key], value, **TOL, msg=key)


def test_with_the_reference_equal_to_the_policy_the_loss_is_log_2_and_the_step_raises_chosen_over_rejected():
    beta = 0.1
    h, w, w_ref, targets, sequence = make_case(1, same_reference=True)
    stats = chunked_stats(h, w, w_ref, targets, sequence)
    out = DPO(beta=beta)(stats)
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0)), rtol=1e-6, atol=1e-7)
    assert float(out.metrics["dpo/reward_margin"]) == pytest.approx(0.0, abs=1e-6)
    grad_h, grad_w = torch.autograd.grad(out.loss, (h, w), retain_graph=True)
    # at margin 0 the gradient is -beta/2 grad(log pi(chosen) - log pi(rejected)), averaged over the pairs
    seq = stats.sequence_sum(torch.where(stats.mask, stats.logp, torch.zeros_like(stats.logp)))
    gap = (seq[PAIRS[:, 0]] - seq[PAIRS[:, 1]]).sum()
    gap_h, gap_w = torch.autograd.grad(gap, (h, w))
    torch.testing.assert_close(grad_h, -beta / 2 * gap_h / len(PAIRS), **TOL)
    torch.testing.assert_close(grad_w, -beta / 2 * gap_w / len(PAIRS), **TOL)
    # a small step against the gradient makes every chosen response likelier relative to its rejected one
    with torch.no_grad():
        h2, w2 = h - 0.5 * grad_h, w - 0.5 * grad_w
    after = DPO(beta=beta)(chunked_stats(h2, w2, w_ref, targets, sequence))
    assert float(after.metrics["dpo/accuracy"]) == 1.0 and float(after.metrics["dpo/reward_margin"]) > 0
    assert float(after.loss) < math.log(2.0)


def test_micro_batches_add_up_to_the_steps_mean_over_pairs():
    """Loss and pair metrics of micro-batches with different token counts, reduced as the module does."""
    h, w, w_ref, targets, sequence = make_case(2)
    whole = DPO()(chunked_stats(h, w, w_ref, targets, sequence))
    total_tokens = (targets != -100).sum().float()
    metrics, loss = StepMetrics(), 0.0
    for rows, pairs in (([0, 1], [[0, 1]]), ([2, 3], [[1, 0]])):  # pair (3, 2) is (1, 0) in its micro-batch
        part = chunked_stats(h[rows], w, w_ref, targets[rows], sequence[rows] - rows[0] * (sequence[rows] >= 0),
                             pairs=torch.tensor(pairs), num_pairs=torch.tensor(2.0))
        part.num_tokens = total_tokens
        out = DPO()(part)
        loss = loss + out.loss
        metrics.add_objective(out.metrics, part.mask.sum() / total_tokens)
    torch.testing.assert_close(loss, whole.loss, **TOL)
    reduced = metrics.reduce(lambda values, op: values)
    for key, value in whole.metrics.items():
        torch.testing.assert_close(reduced[key], value, **TOL, msg=key)


def test_settings_and_missing_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="DPO.beta must be positive"):
        DPO(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(label_smoothing=0.5)
    h, w, w_ref, targets, sequence = make_case(3)
    with pytest.raises(ValueError, match="PairDataModule"):
        DPO()(chunked_stats(h, w, w_ref, targets, sequence, pairs=None))
    empty = chunked_stats(h, w, w_ref, targets, sequence, pairs=torch.zeros((0, 2), dtype=torch.long),
                          num_pairs=torch.tensor(4.0))
    out = DPO()(empty)  # a micro-batch of masked filler pairs: nothing to add
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    assert all(float(v) == 0.0 for v in out.metrics.values())


def test_dpo_trains_on_the_tiny_model_from_the_cli_config(tmp_path):
    """conf/tiny.yaml with DPO and PairDataModule, in process: a few steps, dpo/* logged, the reference frozen."""
    from dft_lightning.cli import build_cli
    from tests.conftest import REPO, read_metrics, series
    from tests.data.test_pairs import pair_rows, write_pairs

    write_pairs(tmp_path / "out" / "pairs" / "part-00000-of-00001.jsonl", pair_rows(8))
    cli = build_cli([
        "--config", str(REPO / "conf" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.objective.class_path=dft_lightning.objectives.DPO", "--model.objective.init_args.beta=0.1",
        "--model.lr=1e-3", "--data.class_path=dft_lightning.data.PairDataModule",
        f"--data.init_args.train={tmp_path / 'out' / 'pairs'}", "--data.init_args.prompt_style=boxed",
        "--data.init_args.batch_size=4", "--data.init_args.micro_batch_size=2", "--data.init_args.cache=false",
    ], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    reference = cli.model._reference  # noqa: SLF001
    assert cli.trainer.global_step == 2 and reference is not None
    assert not any(p.requires_grad for p in reference.parameters())
    rows = read_metrics(tmp_path)
    for key in ("dpo/accuracy", "dpo/reward_margin", "dpo/chosen_reward", "dpo/rejected_reward"):
        assert len(series(rows, key)) == 2, key
    assert 0.0 <= series(rows, "dpo/accuracy")[-1] <= 1.0
    assert series(rows, "train/loss")[0] == pytest.approx(math.log(2.0), abs=1e-5)  # policy = reference at step 0
    assert series(rows, "train/micro_batches")[0] == 2.0


def test_precomputed_reference_log_probs_give_the_live_references_dpo_loss(tmp_path):
    """The pair records are plain rows: tools/precompute_reference.py's values serve DPO as the live reference."""
    from dft_lightning.data.pairs import PairDataModule
    from dft_lightning.module import FineTuneModule
    from dft_lightning.precomputed import PrecomputedReference, precompute
    from tests.data.test_pairs import pair_rows, write_pairs

    path = write_pairs(tmp_path / "pairs.jsonl", pair_rows(6))

    def data() -> PairDataModule:
        dm = PairDataModule(train=path, tokenizer="tiny:qwen2", batch_size=4, micro_batch_size=2, cache=False)
        dm.setup("fit")
        return dm

    out = precompute(data(), "tiny:qwen2", tmp_path / "ref.pt", micro_batch_size=4, progress=False)
    dm = data()
    assert PrecomputedReference.load(out).attach(dm) == 12
    torch.manual_seed(0)
    live = FineTuneModule("tiny:qwen2", objective=DPO())
    live.configure_model()
    pre = FineTuneModule("tiny:qwen2", objective=DPO(), reference=f"precomputed:{out}")
    pre.configure_model()
    assert pre._reference is None  # noqa: SLF001
    for step in dm._loader("train", shuffle=True, drop_last=True, global_batch=4):  # noqa: SLF001
        for mb in step:
            assert mb.ref_logp is not None and mb.num_pairs() == 2
            n, pairs = mb.target_mask.sum().float(), torch.tensor(4.0)
            a, b = live.token_stats(mb, n, pairs), pre.token_stats(mb, n, pairs)
            torch.testing.assert_close(DPO()(b).loss, DPO()(a).loss, rtol=1e-5, atol=1e-7)
