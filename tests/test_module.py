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


class StatsSeen(L.Callback):
    """Collects what the token-statistics hook hands to callbacks."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_train_token_stats(self, trainer, pl_module, batch, stats) -> None:
        self.seen.append((batch.supervised_tokens(), stats))


def fit_and_save(tmp_path, objective, steps: int = 2, callbacks=(), **module_kwargs):
    torch.manual_seed(0)
    module = FineTuneModule("tiny:qwen2", objective=objective, **module_kwargs)
    data = DemoMathDataModule(num_train=16, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=4,
                              data_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, data)
    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_checkpoints_restore_the_objective_and_the_step_counters(tmp_path):
    seen = StatsSeen()
    trained, path = fit_and_save(tmp_path, DFT(min_weight=0.2), callbacks=[seen])
    # the hook saw every micro-batch of both steps, detached, with the step's token count
    assert len(seen.seen) == 4 and not any(s.logp.requires_grad for _, s in seen.seen)
    assert all(int(s.mask.sum()) == n for n, s in seen.seen)
    assert trained._tokens_seen == sum(n for n, _ in seen.seen) > 0
    loaded = FineTuneModule.load_from_checkpoint(path)
    assert type(loaded.objective) is DFT and loaded.objective.min_weight == 0.2
    assert loaded._tokens_seen == trained._tokens_seen
    for (name, a), b in zip(loaded.model.state_dict().items(), trained.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_restored_reference_objective_gets_its_reference_and_a_named_objective_wins(tmp_path, caplog):
    _, path = fit_and_save(tmp_path, IWSFT(), steps=1)
    loaded = FineTuneModule.load_from_checkpoint(path)
    assert type(loaded.objective) is IWSFT and loaded._reference is not None
    start = FineTuneModule("tiny:qwen2")
    start.configure_model()  # the reference is the starting model, not the trained one
    for (name, a), b in zip(loaded._reference.state_dict().items(), start.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with caplog.at_level("INFO"):
        named = FineTuneModule.load_from_checkpoint(path, objective=SFT())
    assert type(named.objective) is SFT and named._reference is None
    assert "objective SFT() from the config replaces the checkpoint's IWSFT(" in caplog.text


def test_objective_specs_round_trip_also_for_classes_outside_the_base():
    from dft_lightning.objectives import build_objective, objective_spec

    class Plain:  # the objective shape without the base class: constructor arguments kept as attributes
        requires = frozenset()

        def __init__(self, gamma: float = 2.0) -> None:
            self.gamma = gamma

    spec = objective_spec(DFT(0.3))  # positional arguments are recorded by name, defaults filled in
    assert spec["class_path"] == "dft_lightning.objectives.dft.DFT" and spec["init_args"]["min_weight"] == 0.3
    assert objective_spec(build_objective(spec)) == spec
    assert objective_spec(Plain(gamma=0.5))["init_args"] == {"gamma": 0.5}
    from dft_lightning.errors import UserError

    with pytest.raises(UserError, match="my_missing.Objective cannot be imported"):
        build_objective({"class_path": "my_missing.Objective", "init_args": {}})


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, "model.lr=-1.0 must be a positive number"),
    ("warmup_ratio", 1.5, "model.warmup_ratio=1.5 must be in [0, 1]"),
    ("max_grad_norm", -0.1, "model.max_grad_norm=-0.1 must be zero"),
])
def test_out_of_range_settings_name_the_key(key, value, message):
    from dft_lightning.errors import UserError

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        FineTuneModule("tiny:qwen2", **{key: value})


class NaNAtStep(SFT):
    """SFT whose loss is NaN from optimizer step ``start`` on (a blow-up in the middle of a run)."""

    def __init__(self, start: int = 1) -> None:
        self.start, self.calls = start, 0

    def __call__(self, stats):
        out = super().__call__(stats)
        self.calls += 1
        return type(out)(loss=out.loss * float("nan")) if self.calls > self.start * 2 else out  # 2 micro-batches


class Snapshots(L.Callback):
    """Parameters and optimizer state after every training batch (taken step or skipped)."""

    def __init__(self) -> None:
        self.states: list = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        optimizer = trainer.optimizers[0]
        self.states.append((
            {n: p.detach().clone() for n, p in module.named_parameters()},
            {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in optimizer.state.items()},
            trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        ))


def test_a_skipped_step_leaves_parameters_optimizer_and_schedule_bit_identical_and_too_many_stop(tmp_path):
    snapshots = Snapshots()
    torch.manual_seed(0)
    module = FineTuneModule("tiny:qwen2", objective=NaNAtStep(start=1), on_nonfinite="skip", max_nonfinite_skips=3)
    data = DemoMathDataModule(num_train=48, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=4,
                              data_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", max_steps=6, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[snapshots])
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
        trainer.fit(module, data)
    assert len(snapshots.states) == 3 and module.nonfinite.skipped == 3  # a step taken, two skips, the third stops
    (params, optim, sched), *skipped = snapshots.states
    assert optim and sched == 1
    for later_params, later_optim, later_sched in skipped:
        assert later_sched == sched
        assert all(torch.equal(later_params[n], p) for n, p in params.items())
        assert later_optim.keys() == optim.keys()
        for key, state in optim.items():
            assert all(torch.equal(torch.as_tensor(later_optim[key][n]), torch.as_tensor(v)) for n, v in state.items())


def test_a_failed_hf_export_leaves_the_previous_one_whole_and_names_the_path(tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from dft_lightning.errors import StorageError

    module = FineTuneModule("tiny:qwen2")
    module.configure_model()
    out = module.export_hf(tmp_path / "hf" / "final")
    before = sorted(p.name for p in out.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", disk_full)
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)  # the failed export would have differed
    with pytest.raises(StorageError, match=r"HF export to .*hf/final failed \(No space left on device\)"):
        module.export_hf(tmp_path / "hf" / "final")
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["final"]  # no half-written directory left
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    start = FineTuneModule("tiny:qwen2")
    start.configure_model()
    torch.testing.assert_close(next(reloaded.parameters()), next(start.model.lm.parameters()))
    monkeypatch.undo()
    crashed = tmp_path / "hf" / ".final.partial-crashed"  # what a killed export leaves (no clean-up ran)
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\0" * 64)
    module.export_hf(tmp_path / "hf" / "final")  # a later export replaces it whole and removes the leftover
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["final"]
    torch.testing.assert_close(next(AutoModelForCausalLM.from_pretrained(out).parameters()),
                               next(module.model.lm.parameters()))
