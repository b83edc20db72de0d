"""Objectives: analytic values, gradient identities, equivalence with F.cross_entropy, iw-SFT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dft_lightning.objectives import DFT, IWSFT, SFT, TokenStats
from dft_lightning.tokens import token_statistics


@pytest.fixture(autouse=True)
def float64_by_default():
    """These tests compute in float64; restored afterwards so other test files keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_case(batch=3, time=7, hidden=5, vocab=11, seed=0, masked=(0, 1)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, time), generator=g)
    for b, t in [masked]:
        targets[b, t] = -100
    targets[-1, -2:] = -100  # padding at the end of the last row
    return h, w, targets


def stats_for(h, w, targets, ref_logp=None, chunk_size=4):
    logp, entropy = token_statistics(h, w, targets, entropy=True, chunk_size=chunk_size)
    mask = targets != -100
    seq = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets).clone()
    return TokenStats(logp=logp, mask=mask, sequence=seq, num_tokens=mask.sum().double(), ref_logp=ref_logp,
                      entropy=entropy)


def test_sft_equals_cross_entropy():
    h, w, targets = make_case()
    loss = SFT()(stats_for(h, w, targets)).loss
    logits = h @ w.T
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    g1 = torch.autograd.grad(loss, (h, w))
    g2 = torch.autograd.grad(expected, (h, w))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("vocab", [2, 17, 1000])
def test_dft_uniform_logits_is_ce_over_vocab(vocab):
    h = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.zeros(vocab, 4, requires_grad=True)  # all logits 0: p = 1 / V
    targets = torch.randint(0, vocab, (2, 5))
    stats = stats_for(h, w, targets)
    dft, sft = DFT()(stats).loss, SFT()(stats).loss
    torch.testing.assert_close(sft, torch.tensor(math.log(vocab)))
    torch.testing.assert_close(dft, sft / vocab)


def test_dft_gradient_is_minus_gradient_of_probability():
    h, w, targets = make_case(seed=1)
    stats = stats_for(h, w, targets)
    dft = DFT()(stats).loss
    mean_p = stats.token_sum(torch.exp(stats.logp))  # mean of p over supervised tokens
    g_dft = torch.autograd.grad(dft, (h, w), retain_graph=True)
    g_p = torch.autograd.grad(-mean_p, (h, w))
    for a, b in zip(g_dft, g_p, strict=True):
        torch.testing.assert_close(a, b)


def test_dft_matches_weighted_cross_entropy_reference():
    h, w, targets = make_case(seed=2)
    logits = h @ w.T
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100, reduction="none")
    valid = targets.reshape(-1) != -100
    expected = (torch.exp(-ce).detach() * ce)[valid].sum() / valid.sum()
    torch.testing.assert_close(DFT()(stats_for(h, w, targets)).loss, expected)


def test_dft_min_weight_floor():
    h, w, targets = make_case(seed=3)
    stats = stats_for(h, w, targets)
    floor = 0.5
    weights = torch.exp(stats.logp.detach()).clamp_min(floor)
    expected = stats.token_sum(weights * -stats.logp)
    torch.testing.assert_close(DFT(min_weight=floor)(stats).loss, expected)
    with pytest.raises(ValueError, match="min_weight"):
        DFT(min_weight=2.0)


def test_no_nan_from_masked_infinite_logprob():
    logp = torch.tensor([[-float("inf"), -0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    stats = TokenStats(logp=logp, mask=mask, sequence=torch.zeros(1, 3, dtype=torch.long),
                       num_tokens=torch.tensor(2.0), ref_logp=torch.tensor([[-float("inf"), -0.5, -1.0]]))
    for objective in (SFT(), DFT(), IWSFT()):
        loss = objective(stats).loss
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss), type(objective).__name__
        assert torch.isfinite(grad).all(), type(objective).__name__


def test_iwsft_with_reference_equal_to_policy_is_sft():
    h, w, targets = make_case(seed=4)
    stats = stats_for(h, w, targets)
    stats.ref_logp = stats.logp.detach().clone()
    out = IWSFT()(stats)
    sft = SFT()(stats).loss
    torch.testing.assert_close(out.loss, sft)
    torch.testing.assert_close(out.metrics["iw/weight_mean"], torch.tensor(1.0))
    g1 = torch.autograd.grad(out.loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(sft, (h, w))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_iwsft_weights_are_clipped_sequence_ratios():
    h, w, targets = make_case(seed=5)
    stats = stats_for(h, w, targets)
    shift = torch.tensor([0.1, -3.0, 5.0]).unsqueeze(1)  # per sequence log-ratio offsets
    stats.ref_logp = (stats.logp.detach() - shift).clone()
    out = IWSFT(max_weight=16.0)(stats)
    weights = torch.exp(shift.squeeze(1)).clamp(0, 16.0)
    seq_nll = torch.stack([(-stats.logp[i][stats.mask[i]]).sum() for i in range(3)])
    torch.testing.assert_close(out.loss, (weights * seq_nll).sum() / stats.num_tokens)
    torch.testing.assert_close(out.metrics["iw/weight_max"], torch.tensor(16.0))
    counts = stats.mask.sum(1).double()
    torch.testing.assert_close(out.metrics["iw/clipped_frac"], counts[2] / counts.sum())


def test_normalisation_uses_step_token_count():
    h, w, targets = make_case(seed=6)
    stats = stats_for(h, w, targets)
    full = SFT()(stats).loss
    stats.num_tokens = stats.num_tokens * 4  # the step has 4x as many tokens on other micro-batches
    torch.testing.assert_close(SFT()(stats).loss, full / 4)


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 1024])
def test_chunked_statistics_match_naive(chunk_size):
    h, w, targets = make_case(seed=7, vocab=29)
    logp, ent = token_statistics(h, w, targets, entropy=True, chunk_size=chunk_size)
    logits = h @ w.T
    log_probs = torch.log_softmax(logits, -1)
    expected = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    valid = targets != -100
    torch.testing.assert_close(logp[valid], expected[valid])
    assert (logp[~valid] == 0).all()
    torch.testing.assert_close(ent[valid], -(log_probs.exp() * log_probs).sum(-1)[valid])
    g1 = torch.autograd.grad(logp.sum() + ent.sum(), (h, w))
    g2 = torch.autograd.grad(
        expected[valid].sum() + (-(log_probs.exp() * log_probs).sum(-1))[valid].sum(), (h, w)
    )
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
