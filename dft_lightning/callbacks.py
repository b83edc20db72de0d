"""Callbacks: HF-format export of the trained weights during and after training; plain-line progress.

``HFExport`` writes ``<dir>/step-<N>`` every ``every_n_steps`` optimizer steps and ``<dir>/final`` at
the end of training: config, safetensors and tokenizer, loadable by transformers and vLLM. Under
FSDP2 the shards are gathered (every rank takes part; rank zero writes). The evaluation callback
builds on the same export.

``PlainProgressBar`` is the progress bar for output that is not a terminal (batch jobs' log files):
one plain line every ``every_n_steps`` optimizer steps, no carriage returns.

Not handled here: pruning old exports, uploading them anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from dft_lightning.errors import UserError


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


class PlainProgressBar(ProgressBar):
    """Training progress as one plain line every ``every_n_steps`` optimizer steps (and at the first and
    the last step), plus one line after each validation, on rank zero; for logs that are not a terminal::

        step 20/400 (5%)  loss 1.2345  lr 4.90e-05  tokens/s 1234  elapsed 0:01:02  eta 0:19:40

    The CLI picks it when stdout is not a terminal; ``trainer.enable_progress_bar: false`` turns it off.

    Args:
        every_n_steps: optimizer steps between two lines.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise UserError(f"PlainProgressBar every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started: float | None = None
        self._first_step = 0
        self._last_printed = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started, self._first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step, total = trainer.global_step, _total_steps(trainer)
        if not self._enabled or step <= self._first_step or step == self._last_printed:
            return  # no step finished yet, or this one (a skipped step) was printed already
        if step == self._first_step + 1 or step % self.every_n_steps == 0 or step == total:
            self._last_printed = step
            self.print(self.step_line(trainer, step, total), flush=True)

    def step_line(self, trainer: L.Trainer, step: int, total: int | None) -> str:
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"]
        for key, label, spec in (("train/loss", "loss", ".4f"), ("train/lr", "lr", ".2e"),
                                 ("train/tokens_per_s", "tokens/s", ".0f")):
            if key in metrics:
                parts.append(f"{label} {float(metrics[key]):{spec}}")
        elapsed = time.monotonic() - (self._started or time.monotonic())
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._first_step
        if total and done > 0 and step < total:
            parts.append(f"eta {_clock(elapsed / done * (total - step))}")
        return "  ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the validate command prints its own table
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            self.print(f"validation at step {trainer.global_step}: {shown}", flush=True)


def _total_steps(trainer: L.Trainer) -> int | None:
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no estimate (e.g. an iterable without a length): show the step alone
        return None
    return int(total) if total not in (None, float("inf")) and total > 0 else None


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
