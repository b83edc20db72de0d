"""Progress of long work outside the training loop (evaluation, tokenising): a live line on a terminal, plain lines
in a log.

``Progress(description, total, unit)`` counts finished items. On a terminal (the stream's ``isatty()``) one line is
redrawn in place with a carriage return, at most every ``redraw_s``; elsewhere (a batch job's log file, the
evaluation child's log) one plain line is written every ``every_s`` seconds, never a carriage return, and a last
line when the work ends. Every line says the same::

    generating: 120/500 problems (24%)  3.2 problems/s  elapsed 0:00:37  eta 0:01:58

``every_s`` defaults to ``DFT_LIGHTNING_PROGRESS_EVERY_S`` (30 seconds when unset). ``track(items, ...)`` wraps an
iterable. ``reporting(progress)`` makes ``advance(n)`` (called from deep inside an engine or a grader, in the same
thread) count on ``progress``; ``advance`` without one does nothing.

Lines go to standard error by default, so that standard output keeps only results (tables, JSON).

Not handled here: several bars at once, progress of work in other processes (it is counted when their results
come back).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("dft_lightning_progress", default=None)


def default_every_s() -> float:
    """Seconds between two plain lines: ``DFT_LIGHTNING_PROGRESS_EVERY_S``, default 30."""
    try:
        return max(0.0, float(os.environ.get("DFT_LIGHTNING_PROGRESS_EVERY_S", "30")))
    except ValueError:
        return 30.0


def clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts ``done`` of ``total`` items and shows it (see the module docstring).

    Args:
        description: what is being done (``generating``, ``grading math500``).
        total: how many items there are.
        unit: what an item is, plural (``problems``, ``completions``, ``rows``).
        stream: where lines go (default: standard error).
        every_s: seconds between plain lines (default ``default_every_s()``).
        redraw_s: seconds between redraws on a terminal.
        enabled: ``False`` shows nothing (other ranks).
        start: items already done before this run (a resumed job): counted in ``done``, not in the rate or ETA.

    ``detail`` (set at any time) is appended to every line (``12 rows written this run``).
    """

    def __init__(self, description: str, total: int, unit: str = "items", *, stream: IO[str] | None = None,
                 every_s: float | None = None, redraw_s: float = 0.5, enabled: bool = True, start: int = 0) -> None:
        self.description, self.total, self.unit = description, max(0, int(total)), unit
        self.detail = ""
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = default_every_s() if every_s is None else every_s
        self.redraw_s, self.enabled = redraw_s, enabled
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.done = self.start = max(0, int(start))
        self.started = time.monotonic()
        self._shown_at: float | None = None
        self._closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [f"{self.description}: {self.done}/{self.total} {self.unit}"
                 + (f" ({100 * self.done // self.total}%)" if self.total else "")]
        ran = self.done - self.start
        if ran and elapsed > 0:
            parts.append(f"{ran / elapsed:.2f} {self.unit}/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if ran and self.done < self.total:
            parts.append(f"eta {clock(elapsed / ran * (self.total - self.done))}")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)

    def _show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and self._shown_at is not None and now - self._shown_at < (self.redraw_s if self.tty
                                                                                   else self.every_s):
            return
        if not final and self._shown_at is None and not self.tty and now - self.started < self.every_s:
            return  # plain lines: the first one after every_s (short work shows only its last line)
        self._shown_at = now
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        """``n`` more items are finished."""
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        self._show()

    def reach(self, done: int) -> None:
        """At least ``done`` items are finished (for work that reports only when it is over)."""
        if done > self.done:
            self.update(done - self.done)

    def close(self) -> None:
        """The work is over: the last line (a newline after a terminal's live line)."""
        if not self._closed:
            self._closed = True
            self._show(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "items",
          **kwargs: Any) -> Iterator[T]:
    """Iterate over ``items``, counting each one on a ``Progress``."""
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(description, count, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()


@contextlib.contextmanager
def reporting(progress: Progress | None) -> Iterator[Progress | None]:
    """Make ``advance`` count on ``progress`` inside the block."""
    token = _ACTIVE.set(progress)
    try:
        yield progress
    finally:
        _ACTIVE.reset(token)


def advance(n: int = 1) -> None:
    """Count ``n`` finished items on the ``Progress`` of the enclosing ``reporting`` block, if any."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.update(n)
