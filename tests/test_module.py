"""FineTuneModule: normalisation invariance, LoRA export, reference handling, schedule."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.module import FineTuneModule, warmup_cosine
from dft_lightning.objectives import DFT, IWSFT, SFT


class GradCapture(L.Callback):
    """Keeps a copy of every gradient right before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def one_step(tmp_path, micro_batch_size: int, objective, **module_kwargs):
    torch.manual_seed(0)
    capture = GradCapture()
    module = FineTuneModule("tiny:qwen2", objective=objective, max_grad_norm=0.0, warmup_ratio=0.0, **module_kwargs)
    data = DemoMathDataModule(num_train=16, num_test=4, tokenizer="tiny:qwen2", batch_size=8,
                              micro_batch_size=micro_batch_size, data_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[capture], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    return capture.grads, module


@pytest.mark.parametrize("objective", [SFT, DFT, IWSFT], ids=lambda c: c.__name__)
def test_micro_batching_does_not_change_the_gradient(tmp_path, objective):
    whole, _ = one_step(tmp_path, 8, objective())
    split, _ = one_step(tmp_path, 1, objective())
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_trains_adapters_only_and_exports_merged_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    grads, module = one_step(tmp_path, 4, IWSFT(), lora=lora, lr=1e-2)
    assert grads and all("lora_" in n for n in grads)
    out = module.export_hf(tmp_path / "merged")
    assert json.loads((out / "dft_lightning.json").read_text())["merged_lora"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    module.model.eval()
    with torch.no_grad():
        expected = module.model.lm(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    adapter = module.export_hf(tmp_path / "adapter", merge_lora=False)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_warmup_cosine_schedule():
    f = warmup_cosine(100, 0.1, 0.0)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert warmup_cosine(10, 0.0, 0.1)(10) == pytest.approx(0.1)


def test_activation_checkpointing_gives_the_same_gradient(tmp_path):
    plain, _ = one_step(tmp_path, 4, DFT())
    recomputed, module = one_step(tmp_path, 4, DFT(), gradient_checkpointing=True)
    assert module.model.lm.is_gradient_checkpointing
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


class NaNLoss(SFT):
    """SFT with a NaN loss (a stand-in for a numerical blow-up)."""

    def __call__(self, stats):
        out = super().__call__(stats)
        return type(out)(loss=out.loss * float("nan"))


def test_nonfinite_loss_raises_naming_the_step_or_is_skipped(tmp_path):
    expected = r"non-finite loss nan or gradient norm nan at step 0 \(rows \['train.jsonl:"
    with pytest.raises(FloatingPointError, match=expected):
        one_step(tmp_path, 8, NaNLoss())
    grads, module = one_step(tmp_path, 8, NaNLoss(), on_nonfinite="skip")
    assert not grads  # the optimizer never stepped
    start = FineTuneModule("tiny:qwen2")
    start.configure_model()
    for (name, a), b in zip(module.model.state_dict().items(), start.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
