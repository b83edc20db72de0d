"""Errors that carry a user-facing, one-line message (the CLI prints them without a traceback)."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's config or data; the message names the key, file or row."""


class DataError(UserError):
    """Bad or missing training data."""


class PretrainedError(UserError, FileNotFoundError):
    """``model.pretrained`` names nothing that can be loaded (also a ``FileNotFoundError``)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or package the config names is not there (also a ``FileNotFoundError``)."""


class StorageError(UserError, OSError):
    """A write that failed (a full disk, no permission); the message names the path and what was kept."""


def signal_ending(code: int) -> str:
    """The signal a negative exit code stands for, as a failure line names it: ``SIGKILL (often the kernel's
    out-of-memory killer)``, ``SIGSEGV``, ``signal 77``."""
    import signal

    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return name + (" (often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else "")
