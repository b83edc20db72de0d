"""Pre-emption: SIGTERM, or SLURM's requeue signal, ends the run with a checkpoint to resume from.

``Preemption`` (added by the CLI) replaces Lightning's SIGTERM handling once training starts. A
signal only sets a flag; at the end of the current optimizer step every rank learns whether any
rank got one (one small all-reduce per step) and all save one checkpoint together (atomically, see
``dft_lightning.checkpointing``). The step's metrics are logged (and a validation due then runs),
and the run ends before the next step: exit status ``128 + signal`` on rank zero (143
for SIGTERM, as if the signal had ended it), 0 on the other ranks (so a launcher does not kill rank
zero while it finishes), no traceback. The checkpoint is the state after that step, the same as a
``ModelCheckpoint`` save there, so resuming from it continues exactly.

Where it is saved:

* under SLURM (Lightning's ``SLURMEnvironment``): ``<trainer.default_root_dir>/hpc_ckpt_<N>.ckpt``,
  which Lightning resumes from by itself when the same job starts again; on the requeue signal
  (``SIGUSR1``, or ``SLURMEnvironment(requeue_signal=...)``; sent with ``#SBATCH --signal=SIGUSR1@90``)
  rank zero also runs ``scontrol requeue <job id>``. ``SLURMEnvironment(auto_requeue=False)`` leaves
  the requeue signal alone.
* elsewhere: ``last.ckpt`` in the ``ModelCheckpoint``'s directory (``--ckpt_path=last`` finds it), or
  ``<log dir>/checkpoints/last.ckpt`` without one; the path is printed.

Not handled here: a signal before training starts (Lightning's or the default handling applies) or
during the last step (the run finishes normally, after the checkpoint); a step or validation run longer than the
scheduler's grace period (the job is killed before the step ends: resume from the last periodic
checkpoint).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class Preempted(SystemExit):
    """Raised on every rank after the pre-emption checkpoint is saved; its code is the exit status."""


class Preemption(L.Callback):
    """Save a checkpoint and stop at the end of the step in which SIGTERM (or SLURM's requeue signal) came."""

    def __init__(self) -> None:
        self._term = self._requeue = False
        self._requeue_signal: int | None = None
        self._exit_code: int | None = None

    @staticmethod
    def _slurm(trainer: L.Trainer) -> SLURMEnvironment | None:
        env = getattr(trainer.strategy, "cluster_environment", None)  # one device: the connector has it
        env = env if env is not None else getattr(trainer._accelerator_connector, "cluster_environment", None)
        return env if isinstance(env, SLURMEnvironment) else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_term)
        slurm = self._slurm(trainer)
        if slurm is not None and slurm.auto_requeue and slurm.requeue_signal is not None:
            self._requeue_signal = int(slurm.requeue_signal)
            signal.signal(slurm.requeue_signal, self._on_requeue)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._term = True

    def _on_requeue(self, signum: int, frame: Any) -> None:
        self._requeue = True

    def _agreed(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(any rank got SIGTERM, any rank got the requeue signal)."""
        flags = (self._term, self._requeue)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            values = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
            flags = (bool(values[0] > 0), bool(values[1] > 0))
        return flags

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._exit_code is not None:
            return
        term, requeue = self._agreed(trainer)
        if not (term or requeue):
            return
        path = self.save_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(self._requeue_signal).name if requeue else "SIGTERM"
        message = f"[dft_lightning] {name}: checkpoint of step {trainer.global_step} saved to {path}"
        if requeue and trainer.is_global_zero:
            message += "; " + _requeue_job()
        elif self._slurm(trainer) is not None:
            message += "; a run of this job started again resumes from it by itself"
        else:
            message += f"; resume with --ckpt_path={path}"
        rank_zero_info(message)
        signum = self._requeue_signal if requeue else int(signal.SIGTERM)
        self._exit_code = 128 + signum if trainer.is_global_zero else 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """Stop before the next step, once the step that saved has been logged (and validated, if due)."""
        if self._exit_code is not None:
            raise Preempted(self._exit_code)

    def save_path(self, trainer: L.Trainer) -> Path:
        if self._slurm(trainer) is not None:  # the name Lightning's resume of a requeued job looks for
            return Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _requeue_job() -> str:
    """``scontrol requeue <job id>``; returns what happened, for the log line."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        rank_zero_warn("SLURM requeue signal, but SLURM_JOB_ID is not set: the job was not requeued")
        return "not requeued (no SLURM_JOB_ID)"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        rank_zero_warn(f"scontrol requeue {job} failed ({e}): requeue the job yourself")
        return f"scontrol requeue {job} failed"
    if done.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({done.returncode}: {done.stderr.strip()[:200]}): "
                       "requeue the job yourself")
        return f"scontrol requeue {job} failed"
    return f"job {job} requeued; it resumes from this checkpoint by itself"
