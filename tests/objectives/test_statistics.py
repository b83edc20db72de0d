"""Statistics beyond logp (one registry entry each) and the objectives built on them: EAFT, SADFT."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from dft_lightning.objectives import DFT, SFT, Objective, ObjectiveOutput, TokenStats
from dft_lightning.objectives.eaft import EAFT
from dft_lightning.objectives.sadft import NUMERIC, OTHER, SADFT, STOPWORD, token_class
from dft_lightning.tokens import STATISTICS, chunked_statistics, register_statistic


def case(seed=0, batch=3, time=6, hidden=5, vocab=13):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, time), generator=g)
    targets[0, :2] = -100
    targets[-1, -1] = -100
    return h, w, targets


def stats_of(h, w, targets, requested=None, chunk_size=4):
    out = chunked_statistics(h, w, targets, requested, chunk_size=chunk_size)
    mask = targets != -100
    return TokenStats(logp=out.pop("logp"), mask=mask, sequence=torch.zeros_like(targets),
                      num_tokens=mask.sum().double(), entropy=out.pop("entropy", None), targets=targets, extra=out)


def direct(h, w, targets):
    """Full logits, log-probs and the supervised mask, for formula checks."""
    logits = h @ w.T
    logq = torch.log_softmax(logits, -1)
    mask = targets != -100
    logp = logq.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logits, logq, logp, mask


def assert_same_loss_and_grads(loss, expected, inputs):
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-10)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 13, 50])
def test_topk_entropy_equals_the_renormalised_top_k_distribution(k):
    h, w, targets = case()
    got = stats_of(h, w, targets, {"topk_entropy": {"k": k}}).topk_entropy
    logits, _, _, mask = direct(h, w, targets)
    top = logits.topk(min(k, logits.shape[-1]), -1).values
    q = torch.softmax(top, -1)
    expected = -(q * q.log()).sum(-1) * mask
    torch.testing.assert_close(got, expected)
    if k >= 13:  # all tokens: the plain entropy
        full = stats_of(h, w, targets, {"entropy": {}}).entropy
        torch.testing.assert_close(got, full)
    torch.autograd.grad(got.sum(), (h, w))  # differentiable through the checkpointed chunks


def test_a_new_statistic_is_one_registration_and_reaches_the_objective(monkeypatch, tmp_path):
    monkeypatch.setitem(STATISTICS, "margin", STATISTICS["entropy"])  # restored after the test
    register_statistic("margin", lambda chunk, options: chunk.logits.topk(2, -1).values.diff(dim=-1).squeeze(-1).neg(),
                       "gap between the two largest logits")

    class MarginSFT(Objective):
        requires = frozenset({"margin"})

        def __call__(self, stats):
            return ObjectiveOutput(stats.token_sum(stats.nll()), {"margin/mean": stats.token_mean(stats.margin)})

    h, w, targets = case()
    stats = stats_of(h, w, targets, {"margin": {}})
    logits, _, _, mask = direct(h, w, targets)
    top2 = logits.topk(2, -1).values
    torch.testing.assert_close(stats.margin, (top2[..., 0] - top2[..., 1]) * mask)
    with pytest.raises(AttributeError, match="add it to the objective's requires"):
        _ = stats_of(h, w, targets).margin
    from tests.test_module import one_step

    _, module = one_step(tmp_path, 4, MarginSFT())
    assert "margin/mean" in module.trainer.logged_metrics


def test_eaft_equals_its_formula_and_alpha_zero_is_sft():
    h, w, targets = case(seed=1)
    k = 4
    logits, logq, logp, mask = direct(h, w, targets)
    q = torch.softmax(logits.topk(k, -1).values, -1)
    weight = (-(q * q.log()).sum(-1) / math.log(k)).detach()
    expected = torch.where(mask, weight * -logp, torch.zeros_like(logp)).sum() / mask.sum()
    stats = stats_of(h, w, targets, {"topk_entropy": {"k": k}})
    out = EAFT(k=k)(stats)
    assert_same_loss_and_grads(out.loss, expected, (h, w))
    assert 0 < float(out.metrics["eaft/weight_mean"]) <= 1
    stats = stats_of(h, w, targets, {"topk_entropy": {"k": k}})
    assert_same_loss_and_grads(EAFT(k=k, alpha=0.0)(stats).loss, SFT()(stats_of(h, w, targets)).loss, (h, w))
    with pytest.raises(ValueError, match="EAFT.k"):
        EAFT(k=1)


def sadft_with(classes, **kwargs):
    objective = SADFT(**kwargs)
    objective.set_classes(classes)
    return objective


def test_sadft_equals_its_formula_and_its_limits_are_dft_and_sft():
    h, w, targets = case(seed=2)
    classes = [NUMERIC, STOPWORD, OTHER] * 4 + [OTHER]  # 13 ids
    _, _, logp, mask = direct(h, w, targets)
    exponent = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)[torch.tensor(classes)[targets.clamp_min(0)]]
    weight = logp.detach().exp() ** exponent
    expected = torch.where(mask, weight * -logp, torch.zeros_like(logp)).sum() / mask.sum()
    out = sadft_with(classes)(stats_of(h, w, targets))
    assert_same_loss_and_grads(out.loss, expected, (h, w))
    shares = [float(out.metrics[f"sadft/{n}_share"]) for n in ("numeric", "stopword", "other")]
    assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
    dft = sadft_with(classes, numeric_weight=1.0, default_weight=1.0)(stats_of(h, w, targets)).loss
    assert_same_loss_and_grads(dft, DFT()(stats_of(h, w, targets)).loss, (h, w))
    sft = sadft_with(classes, numeric_weight=0, stopword_weight=0, default_weight=0)(stats_of(h, w, targets)).loss
    assert_same_loss_and_grads(sft, SFT()(stats_of(h, w, targets)).loss, (h, w))
    with pytest.raises(ValueError, match="no token classes"):
        SADFT()(stats_of(h, w, targets))


def test_sadft_classes_come_from_the_tokenizer_and_unknown_ids_are_other(tiny_tokenizer):
    assert token_class(" 42", frozenset()) == NUMERIC and token_class(" The", frozenset({"the"})) == STOPWORD
    assert token_class("?)", frozenset()) == STOPWORD and token_class(" apple", frozenset({"the"})) == OTHER
    objective = SADFT()
    objective.setup(tiny_tokenizer)
    ids = {}
    for text in ("7", ".", " the"):
        (ids[text],) = tiny_tokenizer.encode(text, add_special_tokens=False)  # one token each
    assert [int(objective._classes[i]) for i in ids.values()] == [NUMERIC, STOPWORD, STOPWORD]
    targets = torch.tensor([[ids["7"], len(tiny_tokenizer) + 5]])  # an id past the tokenizer: "other"
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    stats = TokenStats(logp=logp, mask=torch.ones_like(targets, dtype=torch.bool), sequence=torch.zeros_like(targets),
                       num_tokens=torch.tensor(2.0), targets=targets)
    assert float(objective(stats).metrics["sadft/other_share"]) == 0.5


def test_extreme_and_masked_positions_stay_finite():
    logp = torch.tensor([[-1e4, -1e-12, float("-inf"), 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False]])
    targets = torch.tensor([[1, 0, -100, -100]])
    stats = TokenStats(logp=logp, mask=mask, sequence=torch.zeros_like(targets), num_tokens=torch.tensor(2.0),
                       targets=targets, extra={"topk_entropy": torch.tensor([[0.5, 1e-9, float("nan"), 0.0]])})
    for objective in (EAFT(k=4), sadft_with([NUMERIC, OTHER])):
        loss = objective(stats).loss
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), type(objective).__name__


@pytest.mark.parametrize("objective", [EAFT(k=8), SADFT()], ids=lambda o: type(o).__name__)
def test_trains_in_process_with_its_diagnostics(tmp_path, objective):
    name = type(objective).__name__
    torch.manual_seed(0)
    module_losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            module_losses.append(float(trainer.callback_metrics["train/loss"]))

    from dft_lightning.data.demo import DemoMathDataModule
    from dft_lightning.module import FineTuneModule

    module = FineTuneModule("tiny:qwen2", objective=objective, lr=1e-2, warmup_ratio=0.0)
    data = DemoMathDataModule(num_train=16, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=4,
                              data_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Losses()])
    trainer.fit(module, data)
    assert len(module_losses) == 2 and all(math.isfinite(v) for v in module_losses)
    assert module_losses[0] != module_losses[1], name
    prefix = {"EAFT": "eaft/", "SADFT": "sadft/"}[name]
    assert any(k.startswith(prefix) for k in trainer.logged_metrics), trainer.logged_metrics.keys()


def test_kl_reference_and_asft_equal_their_full_vocabulary_formulas():
    from dft_lightning.objectives import ASFT
    from dft_lightning.tokens import ReferenceStates

    h, w, targets = case(seed=3)
    g = torch.Generator().manual_seed(7)
    ref_h = torch.randn(h.shape, generator=g, dtype=torch.float64)
    ref_w = torch.randn(w.shape, generator=g, dtype=torch.float64)
    states = ReferenceStates(ref_h, ref_w)
    out = chunked_statistics(h, w, targets, {"kl_reference": {}}, chunk_size=4, reference=states)
    _, logq, logp, mask = direct(h, w, targets)
    ref_logq = torch.log_softmax(ref_h @ ref_w.T, -1)
    kl = (ref_logq.exp() * (ref_logq - logq)).sum(-1) * mask
    torch.testing.assert_close(out["kl_reference"], kl)
    assert (kl[mask] > 0).all()
    stats = TokenStats(logp=out["logp"], mask=mask, sequence=torch.zeros_like(targets), num_tokens=mask.sum().double(),
                       targets=targets, extra={"kl_reference": out["kl_reference"]})
    expected = torch.where(mask, logp.detach().exp() * -logp + 0.5 * kl, torch.zeros_like(logp)).sum() / mask.sum()
    assert_same_loss_and_grads(ASFT(kl_weight=0.5)(stats).loss, expected, (h, w))
    out = chunked_statistics(h, w, targets, {"kl_reference": {}}, chunk_size=4, reference=states)
    stats = TokenStats(logp=out["logp"], mask=mask, sequence=torch.zeros_like(targets), num_tokens=mask.sum().double(),
                       extra={"kl_reference": out["kl_reference"]})
    assert_same_loss_and_grads(ASFT(kl_weight=0.0)(stats).loss, DFT()(stats_of(h, w, targets)).loss, (h, w))
    with pytest.raises(ValueError, match="need the reference model's states"):
        chunked_statistics(h, w, targets, {"kl_reference": {}})


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-adapters-off"])
def test_asft_trains_and_its_kl_starts_at_zero(tmp_path, lora):
    from dft_lightning.objectives import ASFT
    from tests.test_module import one_step

    kwargs = {"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}} if lora else {}
    grads, module = one_step(tmp_path, 4, ASFT(kl_weight=1.0), **kwargs)
    assert grads and (module._reference is None) == lora
    # the reference is the starting model: at the first step policy = reference, so the KL is zero
    assert float(module.trainer.logged_metrics["asft/kl_mean"]) == pytest.approx(0.0, abs=1e-6)
    for name, grad in one_step(tmp_path, 4, DFT(), **kwargs)[0].items():  # and its gradient there is DFT's
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kl_reference_is_finite_where_the_reference_rules_tokens_out():
    from dft_lightning.tokens import Chunk

    logits = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    ref = torch.tensor([[1.0, float("-inf"), 0.0]], dtype=torch.float64)  # p_ref = 0 for token 1
    kl = STATISTICS["kl_reference"].compute(Chunk(logits, logits.logsumexp(-1), torch.tensor([0]), ref), {})
    p_ref = torch.softmax(ref, -1)
    logq = torch.log_softmax(logits, -1)
    expected = sum(p_ref[0, i] * (p_ref[0, i].log() - logq[0, i]) for i in (0, 2))
    torch.testing.assert_close(kl, expected.reshape(1))
