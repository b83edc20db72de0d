"""TokenProbabilityLogger: the step's own statistics, summarised like tools/token_probs.py, to every logger."""

from __future__ import annotations

import json
import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.errors import UserError
from dft_lightning.instruments import BIN_EDGES, TokenProbabilityLogger, probability_summary, summary_metrics
from dft_lightning.module import FineTuneModule
from dft_lightning.objectives import DFT
from tests.conftest import REPO, read_metrics

sys.path.insert(0, str(REPO / "tools"))
import token_probs  # noqa: E402
from instruments_common import read_wandb_metrics, wandb_records  # noqa: E402


class StepCapture(L.Callback):
    """At one step: the micro-batches the module trained on, and an HF export of the weights of their forward
    (taken before the optimizer step)."""

    def __init__(self, step: int, export_dir) -> None:
        self.step, self.export_dir = step, export_dir
        self.batches: list = []
        self.forward_calls = 0

    def on_train_token_stats(self, trainer, pl_module, batch, stats) -> None:
        if trainer.global_step == self.step:
            self.batches.append(batch.to("cpu"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            pl_module.export_hf(self.export_dir)


class CountForwards(L.Callback):
    """Counts the policy's forward passes (the callback must add none)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def fit(tmp_path, callbacks, steps: int, loggers):
    torch.manual_seed(0)
    module = FineTuneModule("tiny:qwen2", objective=DFT(), lr=3e-3, warmup_ratio=0.0)
    data = DemoMathDataModule(num_train=16, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=4,
                              data_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=loggers, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, log_every_n_steps=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module, trainer


def test_the_logged_histogram_is_token_probs_at_the_weights_of_that_steps_forward(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    probe = TokenProbabilityLogger(every_n_steps=2)
    capture, forwards = StepCapture(2, tmp_path / "step-2"), CountForwards()
    csv = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), project="instruments-test", offline=True)
    module, trainer = fit(tmp_path, [probe, capture, forwards], steps=3, loggers=[csv, wandb_logger])
    wandb_logger.experiment.finish()
    assert [step for step, _ in probe.history] == [0, 2]
    assert forwards.calls == 3 * 2  # two micro-batches per step, no extra forward
    logged = dict(probe.history)[2]

    offline = token_probs.token_probabilities(token_probs.load_model(str(tmp_path / "step-2")), capture.batches,
                                              progress=False)[0]
    expected = probability_summary(offline)
    assert logged["count"] == expected["count"] == sum(mb.supervised_tokens() for mb in capture.batches)
    assert logged["histogram"]["counts"] == expected["histogram"]["counts"]
    assert [b["count"] for b in logged["bins"]] == [b["count"] for b in expected["bins"]]
    for key, value in expected["quantiles"].items():
        assert logged["quantiles"][key] == pytest.approx(value, rel=1e-5), key
    assert logged["mean"] == pytest.approx(expected["mean"], rel=1e-5)

    # ... and not the starting weights' numbers, nor the final ones'
    for other in ("tiny:qwen2", module):
        model = token_probs.load_model(other) if isinstance(other, str) else other.eval()
        moved = probability_summary(token_probs.token_probabilities(model, capture.batches, progress=False)[0])
        assert moved["mean"] != pytest.approx(expected["mean"], rel=1e-3)

    # every logger gets the scalars at that step: CSV ...
    rows = {int(r["step"]): r for r in read_metrics(tmp_path / "csv") if r.get("token_probs/q50")}
    assert sorted(rows) == [0, 2]
    for key, value in summary_metrics(logged).items():
        assert float(rows[2][key]) == pytest.approx(value, rel=1e-6), key
    edges = zip(BIN_EDGES[:-1], BIN_EDGES[1:], strict=True)
    shares = [float(rows[2][f"token_probs/share_{lo:g}_{hi:g}"]) for lo, hi in edges]
    assert sum(shares) == pytest.approx(1.0)

    # ... and W&B, which also gets the histogram, in the same row (kept as nested keys: _type, values, bins)
    (run_file,) = sorted(tmp_path.rglob("run-*.wandb"))
    histograms = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {tuple(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            hist = {key[1]: value for key, value in items.items() if key[0] == "token_probs/histogram"}
            if hist:
                histograms.append((items[("trainer/global_step",)], hist, items[("token_probs/q50",)]))
    assert [step for step, _, _ in histograms] == [0, 2]
    _, hist, q50 = histograms[1]
    assert hist["_type"] == "histogram" and hist["values"] == expected["histogram"]["counts"]
    assert np.allclose(hist["bins"], expected["histogram"]["edges"])
    assert q50 == pytest.approx(expected["quantiles"]["q50"], rel=1e-5)
    curves = read_wandb_metrics(run_file.parent)  # the scalars, as plot_curves reads them
    assert [s for s, _ in curves["token_probs/q50"]] == [0.0, 2.0]


def test_summary_of_known_probabilities_and_bad_settings():
    probs = np.array([0.0, 5e-4, 1e-3, 0.05, 0.2, 0.5, 0.95, 1.0])
    summary = probability_summary(probs)
    assert [b["count"] for b in summary["bins"]] == [2, 1, 1, 1, 1, 2]  # [lo, hi) bins, the last one closed
    assert summary["quantiles"]["q50"] == pytest.approx(np.quantile(probs, 0.5))
    assert summary["histogram"]["counts"][0] == 3 and summary["histogram"]["counts"][-1] == 1
    empty = probability_summary(np.zeros(0))
    assert empty["count"] == 0 and empty["mean"] is None and all(b["share"] == 0 for b in empty["bins"])
    with pytest.raises(UserError, match="every_n_steps=0 must be >= 1"):
        TokenProbabilityLogger(every_n_steps=0)
