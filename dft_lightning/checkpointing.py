"""Lightning checkpoints that are never half-written, and a clear error when the disk is full.

Every checkpoint the trainer writes (``ModelCheckpoint``'s files and ``last``, pre-emption saves, a
user's ``trainer.save_checkpoint``) is first written under a hidden name beside its target
(``.partial-<hex>``, which no ``last`` or ``hpc_ckpt_*`` lookup matches), flushed to disk, and then
renamed onto the target in one step: a reader sees the previous checkpoint or the complete new one.
A single file is replaced with ``os.replace``; a sharded checkpoint (a directory: FSDP2 with
``save_distributed_checkpoint``) is swapped with its predecessor atomically where the file system
supports ``renameat2(RENAME_EXCHANGE)`` (Linux), else moved aside, replaced and deleted. Leftover
``.partial-*`` entries of a crashed save are deleted by the next successful save in that directory.

A failed write (``ENOSPC``, no permission) removes what it wrote and raises ``StorageError`` on every
rank (one line naming the target; the CLI prints it and exits with status 2).

``Trainer`` is the CLI's trainer class (``save_checkpoint`` above); ``AtomicCheckpointIO`` is the
CLI's default checkpoint plugin: it writes straight to the file beside the target (no second copy in
memory or in ``/tmp``) and fsyncs it, and on its own (a plain Lightning ``Trainer``) also replaces
the target atomically.

Not handled here: remote file systems (``s3://`` and other URLs are written by Lightning as before),
``AsyncCheckpointIO`` (left as it is), ``ModelCheckpoint(save_last="link")``'s symlink, which
Lightning removes and re-creates (it always points at a complete file, but is missing in between).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from dft_lightning.errors import StorageError

PARTIAL_PREFIX = ".partial-"


def _is_url(path: _PATH) -> bool:
    return "://" in str(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under a directory, to disk."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    elif path.exists():
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(partial: Path, target: Path) -> None:
    """Put the finished ``partial`` (file or directory) in ``target``'s place in one rename.

    The previous ``target`` is deleted once the new one stands. Other ``.partial-*`` entries in the
    directory (left by a crashed save) are deleted too.
    """
    _fsync_tree(partial)
    if partial.is_dir() and target.is_dir() and not target.is_symlink() and _exchange(partial, target):
        shutil.rmtree(partial, ignore_errors=True)  # now the previous checkpoint
    elif partial.is_dir() and (target.is_dir() and not target.is_symlink()):
        old = target.with_name(f"{PARTIAL_PREFIX}old-{uuid.uuid4().hex}")
        os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target.is_dir() and not target.is_symlink():  # a file replaces a sharded checkpoint
            shutil.rmtree(target)
        os.replace(partial, target)
    _fsync_dir(target.parent)
    for stale in target.parent.glob(f"{PARTIAL_PREFIX}*"):
        if stale not in (partial, target):
            _remove(stale)


def storage_message(target: _PATH, error: BaseException) -> str:
    root = error.__cause__ if isinstance(error, StorageError) and error.__cause__ is not None else error
    reason = getattr(root, "strerror", None) or str(root) or type(root).__name__
    return (f"checkpoint {target} could not be written ({reason}); the previous checkpoint there is kept and "
            "nothing partial was left: free space (or choose another ModelCheckpoint dirpath) and resume from it")


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
    """``torch.save`` into a hidden file beside the target, fsync, then ``os.replace`` onto it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_url(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        partial = target.parent / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            publish(partial, target)
        except OSError as e:
            raise StorageError(storage_message(target, e)) from e
        finally:
            if partial.exists():
                _remove(partial)


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
                    publish(partial, target)
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
            _remove(partial)
        if error is not None and _os_error(error) is None:
            raise error
        storage = [item for _, item in failed if item[0]]
        if storage:
            raise StorageError(storage[0][1]) from error
        rank, (_, message) = failed[0]
        raise RuntimeError(f"checkpoint {target}: saving failed on rank {rank}: {message}")
