"""Faults injected into CLI runs by the reliability tests (passed with ``--trainer.callbacks+=``).

Test-only: each callback records what it did in files under ``$DFT_FAULTS_DIR`` so the test can read it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L


def _record(name: str, text: str) -> None:
    folder = os.environ.get("DFT_FAULTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(text)


class RecordPids(L.Callback):
    """Write each rank's process id to ``rank-<r>.pid`` when fitting starts."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _record(f"rank-{trainer.global_rank}.pid", str(os.getpid()))


class DieAtStep(L.Callback):
    """Rank ``rank`` ends at once (``os._exit``, no clean-up) when optimizer step ``step`` starts."""

    def __init__(self, step: int, rank: int = 0, code: int = 1) -> None:
        self.step, self.rank, self.code = step, rank, code

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            _record(f"died-rank-{self.rank}", f"{time.time()}")
            os._exit(self.code)


class SignalAtStep(L.Callback):
    """Rank ``rank`` sends itself ``signum`` (by name, e.g. ``SIGTERM``) when optimizer step ``step`` starts."""

    def __init__(self, step: int, signum: str = "SIGTERM", rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signum))


class PauseAtStep(L.Callback):
    """Every rank writes ``paused-rank-<r>`` and sleeps when optimizer step ``step`` starts (to be killed there)."""

    def __init__(self, step: int, seconds: float = 900.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            _record(f"paused-rank-{trainer.global_rank}", f"{time.time()}")
            time.sleep(self.seconds)


class DieDuringSave(L.Callback):
    """Rank ``rank`` ends at once (``os._exit``) half-way through writing the checkpoint saved after step ``step``.

    The sharded writer (``torch.distributed.checkpoint``) writes a few tensors of this rank's shard, then the
    process is gone: the torn checkpoint a crash, an OOM kill or a node failure leaves.
    """

    def __init__(self, step: int, rank: int = 1, items: int = 3) -> None:
        self.step, self.rank, self.items = step, rank, items

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        from torch.distributed.checkpoint import filesystem

        original, written = filesystem._write_item, []

        def write_then_die(*args: object, **kwargs: object) -> object:
            result = original(*args, **kwargs)
            written.append(1)
            if len(written) >= self.items:
                args[1].flush()
                _record(f"died-rank-{self.rank}", f"{time.time()}")
                os._exit(1)
            return result

        filesystem._write_item = write_then_die
