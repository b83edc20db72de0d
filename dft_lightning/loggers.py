"""Weights & Biases runs that do not hang or stop training: online when it can be reached, offline otherwise.

The CLI starts every ``WandbLogger``'s run before training (rank zero) through ``start_wandb``. W&B's own wait for
its server is lowered to ``WANDB_INIT_TIMEOUT`` seconds (default ``DEFAULT_INIT_TIMEOUT_S`` here instead of W&B's
90; a ``settings`` entry of the logger's own wins). When an online run cannot start (no API key, no network, a
server that does not answer within that time, a refused key), one warning names the reason and the run is started
offline instead, in the logger's ``save_dir`` (``wandb/offline-run-*``; ``wandb sync <that folder>`` uploads it
later); training goes on and the other loggers (CSV) are not touched. An offline run that cannot start either
raises: that is a local problem (a folder that is not writable), not a network one.

Not handled here: a connection that fails after the run has started (W&B's own process keeps retrying and
buffering then), other experiment trackers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

DEFAULT_INIT_TIMEOUT_S = 20.0


def start_wandb(loggers: Iterable[Any]) -> None:
    """Start the run of every ``WandbLogger`` in ``loggers`` now (rank zero), offline when online fails."""
    from lightning.pytorch.loggers import WandbLogger

    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            _start(logger)


def _init_timeout() -> float:
    value = os.environ.get("WANDB_INIT_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_INIT_TIMEOUT_S
    except ValueError:
        return DEFAULT_INIT_TIMEOUT_S


def _with_timeout(init: dict[str, Any]) -> None:
    """Put the init timeout into the logger's ``wandb.init`` keyword arguments unless they set one."""
    import wandb

    settings = init.get("settings")
    if settings is None:
        init["settings"] = wandb.Settings(init_timeout=_init_timeout())
    elif isinstance(settings, dict):
        settings.setdefault("init_timeout", _init_timeout())


def _start(logger: Any) -> None:
    import wandb

    init = logger._wandb_init
    _with_timeout(init)
    mode = str(init.get("mode") or os.environ.get("WANDB_MODE") or "online")
    try:
        logger.experiment  # noqa: B018 - starts the run
        return
    except Exception as e:  # noqa: BLE001 - any failure to start online: go offline
        if mode in ("offline", "dryrun", "disabled"):
            raise
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    try:
        wandb.finish()  # whatever the failed start left behind
    except Exception:  # noqa: BLE001 - nothing to finish
        pass
    logger._experiment = None
    os.environ["WANDB_MODE"] = "offline"
    init["mode"] = "offline"
    where = os.path.join(logger.save_dir or ".", "wandb")
    rank_zero_warn(f"W&B: no online run ({reason}); logging offline instead, under {where} "
                   "(`wandb sync <offline-run folder>` uploads it later); training goes on")
    logger.experiment  # noqa: B018
