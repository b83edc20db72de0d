"""Where the package keeps what it builds (converted models, tiny models, tokenised rows), and how
it writes a directory so that a reader never sees a half-written one.

The bottom layer: both ``data`` and the model layer use it; it imports nothing of the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that replaces it on success.

    A reader sees the previous directory or the complete new one, never a half-written one; when the
    body raises (a crash, a full disk), ``target`` is left as it was and the temporary one is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_torch_atomic(payload: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a hidden file beside ``path``, then renamed over it: readers see the old file or the new
    one, never half of one; nothing is left behind when the save fails."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
