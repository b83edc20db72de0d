"""Precomputed reference log-probs: the tool's values equal the live reference's, training with them equals
training with the live reference, and what they cannot serve (or were not computed for) is refused in one line."""

from __future__ import annotations

import sys
from unittest import mock

import lightning as L
import pytest
import torch

from dft_lightning.data.batching import PackedStepCollator, StepCollator
from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.errors import UserError
from dft_lightning.module import FineTuneModule
from dft_lightning.objectives import ASFT, IWSFT
from dft_lightning.precomputed import PrecomputedReference, precompute
from dft_lightning.reference import Snapshot
from tests.conftest import REPO

DATA = {"num_train": 16, "num_test": 4, "batch_size": 8, "micro_batch_size": 4}


def data_module(data_dir, **overrides) -> DemoMathDataModule:
    dm = DemoMathDataModule(tokenizer="tiny:qwen2", data_dir=str(data_dir), **{**DATA, **overrides})
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tool run on conf/tiny.yaml (in-process), with small data: (file, data dir)."""
    import importlib.util

    root = tmp_path_factory.mktemp("precomputed")
    spec = importlib.util.spec_from_file_location("precompute_reference", REPO / "tools" / "precompute_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = root / "ref" / "tiny.pt"
    args = ["--config", str(REPO / "conf" / "tiny.yaml"), "--output", str(out), "--device", "cpu",
            *(f"--data.init_args.{k}={v}" for k, v in DATA.items()), f"--data.init_args.data_dir={root / 'data'}"]
    with mock.patch.object(sys, "argv", ["precompute_reference.py"]):
        assert tool.main(args) == 0
    return out, root / "data"


def micro_batches(dm: DemoMathDataModule, packed: bool) -> list:
    pad = dm.tokenizer.pad_token_id
    collate = PackedStepCollator(2, pad, 512) if packed else StepCollator(4, pad)
    rows = dm.datasets["train"] + dm.datasets["val"]
    return [mb for i in range(0, len(rows), 8) for mb in collate(rows[i : i + 8])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_precomputed_log_probs_equal_the_live_references(written, packed):
    path, data_dir = written
    dm = data_module(data_dir)
    reference = PrecomputedReference.load(path)
    assert reference.attach(dm) == sum(len(rows) for rows in dm.datasets.values())
    torch.manual_seed(0)
    live = FineTuneModule("tiny:qwen2", objective=IWSFT())
    live.configure_model()
    pre = FineTuneModule("tiny:qwen2", objective=IWSFT(), reference=f"precomputed:{path}")
    pre.configure_model()
    assert pre._reference is None and live._reference is not None
    for mb in micro_batches(dm, packed):
        assert mb.ref_logp is not None and mb.packed == packed
        n = mb.target_mask.sum().float()
        a, b = live.token_stats(mb, n), pre.token_stats(mb, n)
        torch.testing.assert_close(b.ref_logp[a.mask], a.ref_logp[a.mask], rtol=1e-5, atol=1e-6)
        assert torch.all(b.ref_logp[~a.mask] == 0)
        for level in ("sequence", "token"):
            objective = IWSFT(level=level)
            torch.testing.assert_close(objective(b).loss, objective(a).loss, rtol=1e-5, atol=1e-7)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(data_dir, reference=None, level="sequence", steps=2):
    torch.manual_seed(0)
    module = FineTuneModule("tiny:qwen2", objective=IWSFT(level=level), reference=reference, lr=1e-2,
                            warmup_ratio=0.0)
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[losses], enable_checkpointing=False)
    trainer.fit(module, DemoMathDataModule(tokenizer="tiny:qwen2", data_dir=str(data_dir), **DATA))
    return module, losses.losses


def test_training_with_precomputed_log_probs_equals_the_live_reference(written, monkeypatch):
    path, data_dir = written
    _, live = fit(data_dir)

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model ran")

    monkeypatch.setattr(FineTuneModule, "_reference_pass", no_reference)
    module, pre = fit(data_dir, reference=f"precomputed:{path}")
    assert module._reference is None
    assert len(pre) == len(live) == 2
    torch.testing.assert_close(torch.tensor(pre), torch.tensor(live), rtol=1e-5, atol=1e-7)
    assert live[-1] != live[0]


def test_mismatches_are_one_line_errors(written, tmp_path):
    path, data_dir = written
    spec = f"precomputed:{path}"
    with pytest.raises(UserError, match=r"objective ASFT needs the reference's full next-token distribution "
                                        r"\(kl_reference\)"):
        FineTuneModule("tiny:qwen2", objective=ASFT(), reference=spec)
    with pytest.raises(UserError, match="model.reference_update with model.reference=precomputed:.*a moving "
                                        "reference cannot be precomputed"):
        FineTuneModule("tiny:qwen2", objective=IWSFT(), reference=spec, reference_update=Snapshot(every_n_steps=2))
    with pytest.raises(UserError, match="no such file"):
        PrecomputedReference.load(tmp_path / "absent.pt")

    reference = PrecomputedReference.load(path)
    other_tokenizer = data_module(data_dir)
    other_tokenizer.tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(UserError, match=r"the data's tokenizer \(tiny:qwen2\) is not the one"):
        reference.attach(other_tokenizer)
    with pytest.raises(UserError, match=r"16 of 16 train rows \(e\.g\. .*\) are tokenised differently .*"
                                        r"prompt_template"):
        reference.attach(data_module(data_dir, prompt_template="Q: {prompt}"))

    subset = data_module(data_dir)  # a file written for 8 of the 16 training rows (as data.max_samples=8 would)
    subset.datasets["train"] = subset.datasets["train"][:8]
    small = precompute(subset, "tiny:qwen2", tmp_path / "subset.pt", progress=False)
    served = PrecomputedReference.load(small).attach(subset)  # a subset is served by its own file
    assert served == sum(len(rows) for rows in subset.datasets.values()) and len(subset.datasets["train"]) == 8
    with pytest.raises(UserError, match=r"8 of 16 train rows \(e\.g\. .*\) have no precomputed reference log-probs"):
        PrecomputedReference.load(small).attach(data_module(data_dir))
