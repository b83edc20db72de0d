"""Where the package keeps what it builds (converted models, tiny models, tokenised rows), and how it writes a
file or a directory so that a reader never sees a half-written one.

Every replacing write goes the same way: written under a hidden name beside its target, flushed to disk, then put
in the target's place in one rename (``publish``): a file with ``os.replace``; a directory swapped with its
predecessor atomically where the file system supports ``renameat2(RENAME_EXCHANGE)`` (Linux), else moved aside,
replaced and deleted. Users: checkpoints (``checkpointing``), HF exports (``replacing_dir``), the row cache and
precomputed references (``save_torch_atomic``), the offline-RL builder's state (``write_file_atomic``).

The bottom layer: both ``data`` and the model layer use it; it imports nothing of the package.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PARTIAL_PREFIX = ".partial-"  # a checkpoint being written (no ``last`` or ``hpc_ckpt_*`` lookup matches it)


def cache_root() -> Path:
    """Directory for converted and generated artefacts (``$DFT_LIGHTNING_CACHE``)."""
    return Path(os.environ.get("DFT_LIGHTNING_CACHE", Path.home() / ".cache" / "dft_lightning"))


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path | None]:
    """Yield a temporary directory that becomes ``target`` on success; ``None`` if it already exists."""
    if target.exists():
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under a directory, to disk."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    elif path.exists():
        _fsync_file(path)


def remove(path: Path) -> None:
    """Delete a file, link or directory tree; nothing when it is not there."""
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


def publish(partial: Path, target: Path, stale: str | None = None) -> None:
    """Flush the finished ``partial`` (file or directory) to disk and put it in ``target``'s place in one rename.

    The previous ``target`` (file or directory) is deleted once the new one stands. ``stale``: a glob of entries
    in the directory left by crashed writes, deleted too (never ``partial`` or ``target``).
    """
    fsync_tree(partial)
    target_is_dir = target.is_dir() and not target.is_symlink()
    if partial.is_dir() and target_is_dir and _exchange(partial, target):
        shutil.rmtree(partial, ignore_errors=True)  # now the previous one
    elif partial.is_dir() and target_is_dir:
        old = target.with_name(f"{PARTIAL_PREFIX}old-{uuid.uuid4().hex}")
        os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target_is_dir:  # a file replaces a directory
            shutil.rmtree(target)
        elif partial.is_dir() and (target.exists() or target.is_symlink()):  # a directory replaces a file
            target.unlink()
        os.replace(partial, target)
    _fsync_dir(target.parent)
    if stale is not None:
        for leftover in target.parent.glob(stale):
            if leftover not in (partial, target):
                remove(leftover)


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *,
                      prefix: str | None = None, stale: str | None = None) -> Path:
    """Call ``write`` on a hidden file beside ``path`` (named ``prefix`` + a random part; default
    ``.<name>-``), flush and fsync it, then ``publish`` it onto ``path``: readers see the old file or the new one,
    never half of one; nothing is left behind when ``write`` raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f"{prefix if prefix is not None else f'.{path.name}-'}{uuid.uuid4().hex}"
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(partial, path, stale)
    finally:
        if partial.exists():
            remove(partial)
    return path


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that replaces it (``publish``) on success.

    A reader sees the previous directory or the complete new one, never a half-written one; when the
    body raises (a crash, a full disk), ``target`` is left as it was and the temporary one is removed.
    Temporary directories of crashed writes to ``target`` are deleted by the next successful one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{PARTIAL_PREFIX}"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        publish(tmp, target, stale=f"{prefix}*")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_torch_atomic(payload: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a hidden file beside ``path``, then renamed over it (``write_file_atomic``)."""
    import torch

    return write_file_atomic(path, lambda f: torch.save(payload, f))
