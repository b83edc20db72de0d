"""Two CPU processes, FSDP2 (gloo): PSFT against a Snapshot reference refreshed every 2 steps, with sharded
checkpoints every 3 steps. ``tests/test_reference_sharded.py`` runs it, whole and resumed.

    python tests/fsdp2_reference_run.py OUT_DIR DATA_DIR MAX_STEPS [CKPT_PATH]

Rank zero writes ``OUT_DIR/result.json``: the train loss of each step and a digest of the final
reference weights (gathered from the shards).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from dft_lightning import modeling
from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.module import FineTuneModule
from dft_lightning.objectives import PSFT
from dft_lightning.reference import Snapshot


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main(out_dir: str, data_dir: str, steps: int, ckpt_path: str | None = None) -> None:
    L.seed_everything(0)
    module = FineTuneModule("tiny:qwen2", objective=PSFT(), reference_update=Snapshot(every_n_steps=2), lr=1e-2,
                            warmup_ratio=0.0)
    data = DemoMathDataModule(num_train=32, num_test=4, tokenizer="tiny:qwen2", batch_size=8, micro_batch_size=2,
                              data_dir=data_dir)
    losses = Losses()
    checkpoints = ModelCheckpoint(dirpath=Path(out_dir) / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                  filename="{step}")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(save_distributed_checkpoint=True),
                        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[losses, checkpoints])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    state = modeling.full_state_dict(module._reference)  # collective: every rank
    if trainer.global_rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for name, value in sorted(state.items()):
            digest.update(name.encode() + value.to(torch.float32).numpy().tobytes())
        (Path(out_dir) / "result.json").write_text(json.dumps({"losses": losses.losses,
                                                               "reference": digest.hexdigest()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
