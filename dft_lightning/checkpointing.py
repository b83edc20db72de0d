"""Lightning checkpoints that are never half-written, and a clear error when the disk is full.

Every checkpoint the trainer writes (``ModelCheckpoint``'s files and ``last``, pre-emption saves, a
user's ``trainer.save_checkpoint``) is first written under a hidden name beside its target
(``.partial-<hex>``, which no ``last`` or ``hpc_ckpt_*`` lookup matches), flushed to disk, and then
put in the target's place in one rename (``paths.publish``: a file with ``os.replace``, a sharded
checkpoint, a directory under FSDP2 with ``save_distributed_checkpoint``, swapped whole): a reader sees
the previous checkpoint or the complete new one. Leftover ``.partial-*`` entries of a crashed save are
deleted by the next successful save in that directory.

A failed write (``ENOSPC``, no permission) removes what it wrote and raises ``StorageError`` on every
rank (one line naming the target; the CLI prints it and exits with status 2).

``Trainer`` is the CLI's trainer class (``save_checkpoint`` above: every rank writes into the hidden
name, rank zero publishes). ``AtomicCheckpointIO`` is the CLI's default checkpoint plugin: given the
trainer's hidden name it writes there directly and fsyncs (no second copy in memory, in ``/tmp`` or
on disk); on its own (a plain Lightning ``Trainer``) it stages and publishes the file itself.

Not handled here: remote file systems (``s3://`` and other URLs are written by Lightning as before),
``AsyncCheckpointIO`` (left as it is), ``ModelCheckpoint(save_last="link")``'s symlink, which
Lightning removes and re-creates (it always points at a complete file, but is missing in between).
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from dft_lightning.errors import StorageError
from dft_lightning.paths import PARTIAL_PREFIX, publish, remove, write_file_atomic

__all__ = ["PARTIAL_PREFIX", "AtomicCheckpointIO", "Trainer", "publish", "storage_message"]


def _is_url(path: _PATH) -> bool:
    return "://" in str(path)


def storage_message(target: _PATH, error: BaseException) -> str:
    root = error.__cause__ if isinstance(error, StorageError) and error.__cause__ is not None else error
    reason = getattr(root, "strerror", None) or str(root) or type(root).__name__
    full = getattr(root, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    what = "free space" if full else "fix that"
    return (f"checkpoint {target} could not be written ({reason}); the previous checkpoint there is kept and "
            f"nothing partial was left: {what} (or choose another ModelCheckpoint dirpath) and resume from it")


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, its cause, or one rank's failure in a distributed save."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                found = _os_error(failure[0] if isinstance(failure, tuple) else failure)
                if found is not None:
                    return found
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden file beside the target, fsync, then ``publish`` onto it. Under the CLI's
    ``Trainer`` the target already is its hidden ``.partial-<hex>`` (the trainer publishes it once every rank has
    written): then written there directly and fsynced, with no second hidden copy."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_url(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        try:
            if target.name.startswith(PARTIAL_PREFIX):
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                write_file_atomic(target, lambda f: torch.save(checkpoint, f), prefix=PARTIAL_PREFIX,
                                  stale=f"{PARTIAL_PREFIX}*")
        except OSError as e:
            raise StorageError(storage_message(target, e)) from e


class Trainer(L.Trainer):
    """Lightning's ``Trainer`` whose checkpoints are written beside their target and renamed into place.

    Every rank writes its part (a sharded checkpoint) into the same hidden ``.partial-<hex>``; when all
    have succeeded, rank zero renames it onto the target. An error on any rank (a full disk on one
    node) is raised on every rank, so none waits for the others in a collective.
    """

    def save_checkpoint(
        self, filepath: _PATH, weights_only: bool | None = None, storage_options: Any | None = None
    ) -> None:
        from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

        if self.model is None or _is_url(filepath) or isinstance(self.strategy.checkpoint_io, AsyncCheckpointIO):
            return super().save_checkpoint(filepath, weights_only, storage_options)
        strategy = self.strategy
        target = Path(strategy.broadcast(str(filepath)))
        partial = target.parent / strategy.broadcast(f"{PARTIAL_PREFIX}{uuid.uuid4().hex}")
        with self.profiler.profile("save_checkpoint"):
            checkpoint = self._checkpoint_connector.dump_checkpoint(weights_only)
            error: BaseException | None = None
            try:
                strategy.save_checkpoint(checkpoint, partial, storage_options=storage_options)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = e
            except BaseException as e:  # torch.distributed.checkpoint's CheckpointException
                if not type(e).__name__ == "CheckpointException":
                    raise
                error = e
            self._raise_any(error, target, partial)
            if strategy.is_global_zero:
                try:
                    publish(partial, target, stale=f"{PARTIAL_PREFIX}*")
                except OSError as e:
                    error = e
            self._raise_any(error if strategy.is_global_zero else None, target, partial)

    def _raise_any(self, error: BaseException | None, target: Path, partial: Path) -> None:
        """Raise on every rank if any rank failed (one collective when there are several ranks)."""
        local = None
        if error is not None:
            cause = _os_error(error)
            local = (True, storage_message(target, cause)) if cause is not None else (False, f"{error!r}")
        everyone = [local]
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, local)
        failed = [(rank, item) for rank, item in enumerate(everyone) if item is not None]
        if not failed:
            return
        if self.strategy.is_global_zero:
            remove(partial)
        if error is not None and _os_error(error) is None:
            raise error
        storage = [item for _, item in failed if item[0]]
        if storage:
            raise StorageError(storage[0][1]) from error
        rank, (_, message) = failed[0]
        raise RuntimeError(f"checkpoint {target}: saving failed on rank {rank}: {message}")
