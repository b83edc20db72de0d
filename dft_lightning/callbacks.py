"""Callbacks: HF-format export of the trained weights during and after training.

``HFExport`` writes ``<dir>/step-<N>`` every ``every_n_steps`` optimizer steps and ``<dir>/final`` at
the end of training: config, safetensors and tokenizer, loadable by transformers and vLLM. Under
FSDP2 the shards are gathered (every rank takes part; rank zero writes). The evaluation callback
builds on the same export.

Not handled here: pruning old exports, uploading them anywhere.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class HFExport(L.Callback):
    """Export HF weights periodically and at the end of training.

    Args:
        dirpath: output directory; default ``<trainer.log_dir>/hf`` (or ``<default_root_dir>/hf``).
        every_n_steps: export every this many optimizer steps; ``0`` only at the end.
        at_end: export ``final`` when training ends.
        merge_lora: fold LoRA adapters into the weights (else write a peft adapter directory).
    """

    def __init__(
        self, dirpath: str | None = None, every_n_steps: int = 0, at_end: bool = True, merge_lora: bool = True
    ) -> None:
        self.dirpath, self.every_n_steps, self.at_end, self.merge_lora = dirpath, every_n_steps, at_end, merge_lora
        self.exported: list[Path] = []
        self._last_step = -1

    def root(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def export(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> Path:
        path = self.root(trainer) / name
        module.export_hf(path, merge_lora=self.merge_lora)
        trainer.strategy.barrier("hf_export")
        rank_zero_info(f"[dft_lightning] exported HF weights to {path}")
        self.exported.append(path)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step  # a skipped (non-finite) step does not advance global_step
            self.export(trainer, module, f"step-{step}")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.at_end:
            self.export(trainer, module, "final")
