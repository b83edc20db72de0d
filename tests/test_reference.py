"""Moving references (EMA, snapshot): update rules, in training, saved and resumed; PSFT on top of them."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.errors import UserError
from dft_lightning.module import FineTuneModule
from dft_lightning.objectives import SFT, TokenStats
from dft_lightning.objectives.psft import PSFT
from dft_lightning.reference import EMA, Snapshot, paired_parameters


def test_update_rules_move_the_reference_by_name():
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = {n: p.clone() for n, p in reference.named_parameters()}
    EMA(decay=0.75).update(reference, policy)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p, 0.75 * start[name] + 0.25 * dict(policy.named_parameters())[name])
    Snapshot().update(reference, policy)
    assert all(torch.equal(a, b) for a, b in paired_parameters(reference, policy))
    rule = Snapshot(every_n_steps=3)
    assert [s for s in range(8) if rule.due(s)] == [3, 6]
    with pytest.raises(ValueError, match="does not match the policy"):
        paired_parameters(torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="EMA.decay"):
        EMA(decay=1.0)


def test_psft_has_sfts_gradient_at_ratio_one_and_stops_past_the_clip():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[True, True, False]])

    def stats(ref):
        return TokenStats(logp=logp, mask=mask, sequence=torch.zeros(1, 3), num_tokens=torch.tensor(2.0),
                          ref_logp=ref)

    (psft,) = torch.autograd.grad(PSFT()(stats(logp.detach())).loss, logp)
    (sft,) = torch.autograd.grad(SFT()(stats(None)).loss, logp)
    torch.testing.assert_close(psft, sft)
    # p rose well past (1 + clip_high) p_old on the first token: no gradient there; the second keeps r * grad
    old = torch.log(torch.tensor([[0.1, 0.6, float("nan")]], dtype=torch.float64))  # masked NaN stays out
    out = PSFT()(stats(old))
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad[0, 0] == 0 and grad[0, 2] == 0 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad[0, 1], torch.tensor(-(0.5 / 0.6) / 2, dtype=torch.float64))
    assert float(out.metrics["psft/clipped_frac"]) == 0.5


class Record(L.Callback):
    """After each optimizer step: the train loss, the policy's and the reference's parameters."""

    def __init__(self) -> None:
        self.losses, self.policy, self.reference = [], [], []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.policy.append({n: p.detach().clone() for n, p in module.model.named_parameters()})
        self.reference.append({n: p.detach().clone() for n, p in module._reference.named_parameters()})


def fit(tmp_path, update, steps, ckpt_path=None, save_at=None):
    torch.manual_seed(0)
    module = FineTuneModule("tiny:qwen2", objective=PSFT(), reference_update=update, lr=1e-2, warmup_ratio=0.0)
    data = DemoMathDataModule(num_train=32, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=8,
                              data_dir=str(tmp_path / "data"))
    record = Record()
    callbacks = [record]
    if save_at:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_at,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(save_at))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return record


def test_snapshot_and_ema_follow_the_policy_in_training(tmp_path):
    snap = fit(tmp_path, Snapshot(every_n_steps=2), steps=3)
    start = FineTuneModule("tiny:qwen2")
    start.configure_model()
    initial = dict(start.model.named_parameters())
    assert all(torch.equal(snap.reference[0][n], initial[n]) for n in initial)  # not due after step 1
    assert all(torch.equal(snap.reference[1][n], snap.policy[1][n]) for n in initial)  # refreshed after step 2
    assert all(torch.equal(snap.reference[2][n], snap.policy[1][n]) for n in initial)  # held at step 3
    assert any(not torch.equal(snap.policy[2][n], snap.policy[1][n]) for n in initial)
    ema = fit(tmp_path, EMA(decay=0.9), steps=1)
    for name in initial:
        torch.testing.assert_close(ema.reference[0][name], 0.9 * initial[name] + 0.1 * ema.policy[0][name])


def test_a_resumed_run_continues_with_the_same_reference(tmp_path):
    whole = fit(tmp_path, Snapshot(every_n_steps=3), steps=4, save_at=2)
    resumed = fit(tmp_path, Snapshot(every_n_steps=3), steps=4, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert len(resumed.losses) == 2
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses[2:]), rtol=1e-6, atol=1e-7)
    for name, value in whole.reference[-1].items():
        torch.testing.assert_close(resumed.reference[-1][name], value, rtol=1e-6, atol=1e-7)


def test_reference_update_with_lora_is_refused():
    with pytest.raises(UserError, match="model.reference_update with model.lora"):
        FineTuneModule("tiny:qwen2", objective=PSFT(), reference_update=EMA(), lora={"r": 4})
