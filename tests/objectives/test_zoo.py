"""The objective zoo: each objective against a direct full-logits implementation, its limits, extremes, training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from dft_lightning.objectives import (
    CHORD,
    DFT,
    IWSFT,
    SFT,
    DFTSequence,
    Focal,
    ProbPower,
    TokenStats,
    build_objective,
    objective_spec,
)
from dft_lightning.tokens import token_statistics

F64, F32 = torch.float64, torch.float32
TOL = {"rtol": 1e-5, "atol": 1e-12}

# Packed rows: row 0 holds sequences 0 and 1 (its first two targets are prompt), row 1 sequence 2 (one
# prompt token inside), row 2 sequence 3 followed by padding.
SEQUENCE = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1],
                         [2, 2, 2, 2, 2, 2, 2, 2, 2],
                         [3, 3, 3, 3, 3, 3, -1, -1, -1]])


def make_case(seed: int, vocab: int = 13, hidden: int = 6, scale: float = 0.5, dtype=F64):
    """Hidden states, output weight (both requiring grad), a reference weight and targets."""
    g = torch.Generator().manual_seed(seed)
    batch, time = SEQUENCE.shape
    h = (torch.randn(batch, time, hidden, generator=g, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    w_ref = w.detach() + 0.7 * torch.randn(vocab, hidden, generator=g, dtype=dtype)
    targets = torch.randint(0, vocab, (batch, time), generator=g)
    targets[0, :2] = -100
    targets[1, 4] = -100
    targets[SEQUENCE < 0] = -100
    return h, w, w_ref, targets


def chunked_stats(h, w, w_ref, targets) -> TokenStats:
    """Statistics the way the module computes them: chunked, only supervised positions projected."""
    logp = token_statistics(h, w, targets, chunk_size=3)[0]
    with torch.no_grad():
        ref_logp = token_statistics(h, w_ref, targets, chunk_size=3)[0]
    mask = targets != -100
    return TokenStats(logp=logp, mask=mask, sequence=SEQUENCE.clone(), num_tokens=mask.sum().to(logp.dtype),
                      ref_logp=ref_logp)


def full_logp(h, w, targets):
    """Target log-probs from the full ``[batch, time, vocab]`` logits."""
    log_probs = torch.log_softmax(h @ w.T, dim=-1)
    return log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)


# Direct implementations: (h, w, w_ref, targets) -> (loss, {metric: value}), from the formulas alone.

def direct_dft(min_weight, sft_mix):
    def f(h, w, w_ref, targets):
        q = full_logp(h, w, targets)[targets != -100]
        weight = ((1 - sft_mix) * q.exp().detach() + sft_mix).clamp_min(min_weight)
        return (weight * -q).sum() / q.numel(), {"dft/weight_mean": weight.mean()}
    return f


def sequences(targets):
    mask = targets != -100
    return [mask & (SEQUENCE == s) for s in range(int(SEQUENCE.max()) + 1)]


def direct_dft_sequence(length_normalised):
    def f(h, w, w_ref, targets):
        lp = full_logp(h, w, targets)
        loss, weights, counts = 0.0, [], []
        for sel in sequences(targets):
            total = lp[sel].sum()
            weight = torch.exp((lp[sel].mean() if length_normalised else total).detach())
            loss = loss + weight * -total
            weights.append(weight)
            counts.append(sel.sum())
        weights, counts = torch.stack(weights), torch.stack(counts).to(F64)
        n = (targets != -100).sum()
        return loss / n, {"dft_seq/weight_mean": (weights * counts).sum() / counts.sum(),
                          "dft_seq/weight_max": weights.max(), "dft_seq/weight_min": weights.min()}
    return f


def direct_prob_power(alpha, min_p, max_p):
    def f(h, w, w_ref, targets):
        q = full_logp(h, w, targets)[targets != -100]
        p = q.exp().detach()
        keep = (p >= (min_p if min_p is not None else 0.0)) & (p <= (max_p if max_p is not None else 1.0))
        per_token = -q if alpha == 0 else -(q.exp() ** alpha - 1) / alpha
        return per_token[keep].sum() / q.numel(), {"prob_power/kept_frac": keep.to(F64).mean()}
    return f


def direct_chord(h, w, w_ref, targets):
    q = full_logp(h, w, targets)[targets != -100]
    p = q.exp().detach()
    weight = p * (1 - p)
    return (weight * -q).sum() / q.numel(), {"chord/weight_mean": weight.mean()}


def direct_focal(gamma):
    def f(h, w, w_ref, targets):
        q = full_logp(h, w, targets)[targets != -100]
        weight = (1 - q.exp().detach()) ** gamma
        return (weight * -q).sum() / q.numel(), {"focal/weight_mean": weight.mean()}
    return f


def direct_iwsft_token(low, high):
    def f(h, w, w_ref, targets):
        mask = targets != -100
        q, ref = full_logp(h, w, targets)[mask], full_logp(h, w_ref, targets)[mask].detach()
        ratio = (q.detach().exp() / ref.exp())
        weight = ratio.clamp(low, high)
        return (weight * -q).sum() / q.numel(), {
            "iw/weight_mean": weight.mean(), "iw/clipped_frac": ((ratio < low) | (ratio > high)).to(F64).mean(),
            "iw/weight_max": weight.max(), "iw/weight_min": weight.min()}
    return f


def direct_iwsft_sequence(max_weight):
    def f(h, w, w_ref, targets):
        lp, ref = full_logp(h, w, targets), full_logp(h, w_ref, targets).detach()
        loss, weights = 0.0, []
        for sel in sequences(targets):
            weight = torch.exp((lp[sel] - ref[sel]).mean().detach()).clamp(0, max_weight)
            loss = loss + weight * -lp[sel].sum()
            weights.append(weight)
        weights = torch.stack(weights)
        return loss / (targets != -100).sum(), {"iw/weight_max": weights.max(), "iw/weight_min": weights.min()}
    return f


CASES = [
    ("dft", DFT(), direct_dft(0.0, 0.0)),
    ("dft_mix_floor", DFT(min_weight=0.2, sft_mix=0.3), direct_dft(0.2, 0.3)),
    ("dft_sequence", DFTSequence(), direct_dft_sequence(False)),
    ("dft_sequence_normalised", DFTSequence(length_normalised=True), direct_dft_sequence(True)),
    ("prob_power_1", ProbPower(), direct_prob_power(1.0, None, None)),
    ("prob_power_0.5", ProbPower(alpha=0.5), direct_prob_power(0.5, None, None)),
    ("prob_power_band", ProbPower(alpha=2.0, min_p=0.05, max_p=0.3), direct_prob_power(2.0, 0.05, 0.3)),
    ("profit", ProbPower(alpha=0.0, min_p=0.1), direct_prob_power(0.0, 0.1, None)),
    ("chord", CHORD(), direct_chord),
    ("focal", Focal(), direct_focal(2.0)),
    ("focal_0.5", Focal(gamma=0.5), direct_focal(0.5)),
    ("iwsft_token", IWSFT(level="token"), direct_iwsft_token(0.2, 1.8)),
    ("iwsft_token_clip", IWSFT(level="token", token_clip=[0.5, 1.2]), direct_iwsft_token(0.5, 1.2)),
    ("iwsft_sequence", IWSFT(max_weight=1.5), direct_iwsft_sequence(1.5)),
]


@pytest.mark.parametrize("seed, objective, direct", [(i, *c[1:]) for i, c in enumerate(CASES)],
                         ids=[c[0] for c in CASES])
def test_chunked_objective_equals_full_logits_formula(seed, objective, direct):
    h, w, w_ref, targets = make_case(seed)
    out = objective(chunked_stats(h, w, w_ref, targets))
    expected, expected_metrics = direct(h, w, w_ref, targets)
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert out.loss.item() > 0
    got_grads = torch.autograd.grad(out.loss, (h, w))
    want_grads = torch.autograd.grad(expected, (h, w))
    for got, want in zip(got_grads, want_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **TOL)
    for key, value in expected_metrics.items():
        torch.testing.assert_close(out.metrics[key].to(F64), value.to(F64), **TOL, msg=key)


def test_cases_exercise_both_sides_of_each_threshold():
    """The band, ProFit and token-clip cases above keep some tokens and drop (or clip) others."""
    names = [c[0] for c in CASES]
    for name in ("prob_power_band", "profit"):
        seed = names.index(name)
        objective = CASES[seed][1]
        assert 0 < objective(chunked_stats(*make_case(seed))).metrics["prob_power/kept_frac"] < 1
    stats = chunked_stats(*make_case(names.index("iwsft_token")))
    ratio = torch.exp(stats.logp - stats.ref_logp)[stats.mask]
    assert (ratio < 0.2).any() and (ratio > 1.8).any() and ((ratio > 0.2) & (ratio < 1.8)).any()
    assert 0 < IWSFT(level="token")(stats).metrics["iw/clipped_frac"] < 1


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def assert_same_loss_and_grads(a, b, inputs, **tol):
    torch.testing.assert_close(a, b, **tol)
    for x, y in zip(grads(a, inputs), grads(b, inputs), strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("objective", [DFT(sft_mix=1.0), DFT(min_weight=0.3, sft_mix=1.0), ProbPower(alpha=0.0),
                                       Focal(gamma=0.0), IWSFT(level="token")], ids=repr)
def test_limits_that_equal_sft(objective):
    h, w, _, targets = make_case(seed=11)
    stats = chunked_stats(h, w, w.detach(), targets)  # reference = policy
    stats.ref_logp = stats.logp.detach().clone()
    out = objective(stats)
    assert_same_loss_and_grads(out.loss, SFT()(stats).loss, (h, w), rtol=1e-12, atol=1e-15)
    if isinstance(objective, IWSFT):
        assert out.metrics["iw/weight_mean"] == 1 and out.metrics["iw/clipped_frac"] == 0


def test_prob_power_small_alpha_approaches_sft_and_alpha_one_is_one_minus_p():
    h, w, _, targets = make_case(seed=12)
    stats = chunked_stats(h, w, w.detach(), targets)
    sft = SFT()(stats).loss
    small = ProbPower(alpha=1e-6)(stats).loss
    torch.testing.assert_close(small, sft, rtol=1e-5, atol=0)
    for x, y in zip(grads(small, (h, w)), grads(sft, (h, w)), strict=True):  # elementwise sums cancel: scale atol
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    assert not torch.equal(ProbPower(alpha=1e-3)(stats).loss, sft)
    one = ProbPower(alpha=1.0)(stats).loss
    torch.testing.assert_close(one, stats.token_sum(1 - torch.exp(stats.logp)))
    # the gradient of 1 - p is -grad p: DFT's
    for x, y in zip(grads(one, (h, w)), grads(DFT()(stats).loss, (h, w)), strict=True):
        torch.testing.assert_close(x, y)


def test_dft_sequence_weight_underflows_for_long_responses():
    """Eq. 8's weight is exp of a sum: a 300-token response at 0.5 nats per token is 0 in float32."""
    logp = torch.full((2, 300), -0.5, dtype=F32, requires_grad=True)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 20:] = False  # the second response has 20 tokens
    stats = TokenStats(logp=logp, mask=mask, sequence=torch.tensor([[0], [1]]).expand(2, 300).clone(),
                       num_tokens=torch.tensor(320.0, dtype=F32))
    out = DFTSequence()(stats)
    assert out.metrics["dft_seq/weight_min"] == 0 and out.metrics["dft_seq/underflow_frac"] == 300 / 320
    torch.testing.assert_close(out.metrics["dft_seq/weight_max"], torch.tensor(math.exp(-10.0), dtype=F32))
    torch.testing.assert_close(out.loss, torch.tensor(math.exp(-10.0) * 10.0 / 320, dtype=F32))
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert (grad[0] == 0).all() and (grad[1, :20] < 0).all()  # the long response does not train at all
    normalised = DFTSequence(length_normalised=True)(stats)
    torch.testing.assert_close(normalised.metrics["dft_seq/weight_mean"], torch.tensor(math.exp(-0.5), dtype=F32))
    assert normalised.metrics["dft_seq/underflow_frac"] == 0
    torch.testing.assert_close(normalised.loss, torch.tensor(math.exp(-0.5) * 0.5, dtype=F32))


ALL = [DFT(), DFT(min_weight=0.05, sft_mix=0.3), DFTSequence(), DFTSequence(length_normalised=True), ProbPower(),
       ProbPower(alpha=0.0), ProbPower(alpha=0.5, min_p=0.01, max_p=0.99), CHORD(), Focal(), Focal(gamma=0.5),
       IWSFT(), IWSFT(level="token"), SFT()]


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_extreme_and_masked_positions_stay_finite(objective):
    inf = float("inf")
    # masked: -inf and -1e4; supervised: p -> 0 (-1e4, -200), p -> 1 (-1e-9, 0), ordinary
    logp = torch.tensor([[-inf, -1e4, -1e4, -200.0, -1e-9, 0.0, -0.7],
                         [-1e4, -inf, -2.0, -1e-30, -inf, -inf, -inf]], dtype=F32, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True, True, True],
                         [False, False, True, True, False, False, False]])
    ref = torch.tensor([[-inf, -inf, 0.0, -1e4, -1e4, -inf, -0.1],
                        [-inf, -1e4, -1e4, 0.0, -inf, -1e4, -inf]], dtype=F32)
    stats = TokenStats(logp=logp, mask=mask, sequence=torch.tensor([[0] * 7, [1] * 4 + [-1] * 3]),
                       num_tokens=mask.sum().float(), ref_logp=ref)
    out = objective(stats)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (out.loss, grad)
    assert (grad[~mask] == 0).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value), key

    # the same through the chunked statistics, with logits of magnitude ~1e3 (p -> 0 and p -> 1)
    h, w, w_ref, targets = make_case(seed=13, scale=300.0, dtype=F32)
    likeliest = (h @ w.T).argmax(-1)
    targets[1:] = torch.where(targets[1:] >= 0, likeliest[1:], targets[1:])  # rows 1, 2: the most likely token
    stats = chunked_stats(h, w, w_ref, targets)
    assert stats.logp[stats.mask].min() < -100 and stats.logp[stats.mask].max() > -1e-6
    out = objective(stats)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.loss, (h, w)))


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_a_micro_batch_without_supervised_tokens_gives_zero_loss_and_the_same_keys(objective):
    h, w, w_ref, targets = make_case(seed=14)
    keys = set(objective(chunked_stats(h, w, w_ref, targets)).metrics)
    empty = chunked_stats(h, w, w_ref, torch.full_like(targets, -100))
    empty.num_tokens = torch.tensor(10.0, dtype=F64)  # other micro-batches of the step have tokens
    out = objective(empty)
    assert set(out.metrics) == keys and out.loss == 0
    for key, value in out.metrics.items():
        assert torch.isfinite(value) or (key.endswith("_max") and value == -math.inf) or (
            key.endswith("_min") and value == math.inf), key


@pytest.mark.parametrize("make, message", [
    (lambda: DFT(sft_mix=1.5), "DFT.sft_mix must be in [0, 1], got 1.5"),
    (lambda: DFTSequence(length_normalised="yes"), "DFTSequence.length_normalised must be true or false"),
    (lambda: ProbPower(alpha=-0.5), "ProbPower.alpha must be a finite number >= 0, got -0.5"),
    (lambda: ProbPower(max_p=1.5), "ProbPower.max_p must be in [0, 1] or null, got 1.5"),
    (lambda: ProbPower(min_p=0.6, max_p=0.5), "ProbPower.min_p=0.6 must not exceed ProbPower.max_p=0.5"),
    (lambda: Focal(gamma=-1.0), "Focal.gamma must be a finite number >= 0, got -1.0"),
    (lambda: IWSFT(level="tokens"), "IWSFT.level must be one of 'sequence', 'token', got 'tokens'"),
    (lambda: IWSFT(token_clip=(1.8, 0.2)), "IWSFT.token_clip must satisfy 0 <= low <= high"),
    (lambda: IWSFT(token_clip=0.2), "IWSFT.token_clip must be two numbers"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_settings_name_the_class_and_argument(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_checkpoint_spec_rebuilds_the_same_objective(objective):
    rebuilt = build_objective(objective_spec(objective))
    assert type(rebuilt) is type(objective) and vars(rebuilt) == vars(objective)


class StepLog(L.Callback):
    """``trainer.callback_metrics`` after each training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.mark.parametrize("objective, diagnostics", [
    (DFT(min_weight=0.05, sft_mix=0.3), ["dft/weight_mean"]),
    (DFTSequence(length_normalised=True), ["dft_seq/weight_mean", "dft_seq/underflow_frac", "dft_seq/weight_max",
                                           "dft_seq/weight_min"]),
    (ProbPower(alpha=0.5, min_p=1e-4), ["prob_power/kept_frac"]),
    (CHORD(), ["chord/weight_mean"]),
    (Focal(), ["focal/weight_mean"]),
    (IWSFT(level="token"), ["iw/weight_mean", "iw/clipped_frac", "iw/weight_max", "iw/weight_min"]),
], ids=["DFT", "DFTSequence", "ProbPower", "CHORD", "Focal", "IWSFT-token"])
def test_trains_on_the_tiny_model(demo_dir, objective, diagnostics):
    from dft_lightning.data.demo import DemoMathDataModule
    from dft_lightning.module import FineTuneModule

    torch.manual_seed(0)
    log = StepLog()
    module = FineTuneModule("tiny:qwen2", objective=objective, lr=1e-3, warmup_ratio=0.0)
    data = DemoMathDataModule(num_train=16, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=4,
                              data_dir=str(demo_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[log])
    trainer.fit(module, data)
    assert len(log.steps) == 2
    first, second = log.steps
    for step in log.steps:
        assert math.isfinite(step["train/loss"]) and step["train/loss"] > 0
        assert step["train/grad_norm"] > 0  # the objective gives a gradient
        for key in diagnostics:
            assert math.isfinite(step[key]) and step[key] >= 0, key
    assert first["train/loss"] != second["train/loss"]
    if isinstance(objective, IWSFT):  # the reference is the starting model: every ratio is 1 on the first step
        assert first["iw/weight_mean"] == pytest.approx(1.0) and second["iw/weight_mean"] != pytest.approx(1.0)
