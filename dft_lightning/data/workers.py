"""Data-loader workers that die: one error naming the worker, how it ended and the rows it was building.

``WorkerGuardedLoader`` is the data modules' ``DataLoader``. With ``num_workers > 0`` its iterator remembers which
step (row indices) went to which worker, and when a worker process dies (killed for memory, a segfault in a
tokenizer or image decoder, ``os._exit`` in user code) the bare ``DataLoader worker (pid(s) ...) exited
unexpectedly`` becomes a ``WorkerDiedError``::

    data loader worker 1 (pid 4242) was killed by signal SIGKILL (often the kernel's out-of-memory killer) while
    building the steps of rows train.jsonl:7, train.jsonl:12, ...; rerun with data.num_workers=0 to see the
    error in the main process

PyTorch reports a worker's death in two ways: from ``next()`` on the loader (translated here), or from its SIGCHLD
handler, wherever the main process happens to be (then ``describe_worker_failure`` gives the same line for the
error that reached the top; the CLI uses it, exit status 1). Rows are named by their ``row_id`` (``<file>:<line>``).

Not handled here: a worker that hangs without dying (``DataLoader(timeout=...)`` covers it), restarting a worker.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from dft_lightning.errors import signal_ending

_RECENT: deque[_Record] = deque(maxlen=16)  # the loaders' last iterators, to describe a death after they are gone
_SHOWN_ROWS = 6


class WorkerDiedError(RuntimeError):
    """A data-loader worker process ended while the run was using it; the message names it and its rows. A fault
    of the machine or of code, not of the config: the CLI prints it as one line with exit status 1 (a
    ``RuntimeError``, as PyTorch's own report of it)."""


class WorkerGuardedLoader(DataLoader):
    """A ``DataLoader`` whose worker deaths are ``WorkerDiedError`` (see the module docstring). ``row_name`` maps a
    dataset index to the name of its row (set after construction, so Lightning can re-create the loader)."""

    row_name: Callable[[int], str] | None = None

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _GuardedIterator(self)


class _Record:
    """What is needed to describe a dead worker after its iterator is gone (Lightning drops the iterator before the
    error reaches the CLI): the worker processes, the steps sent to each and not received back, row names."""

    def __init__(self, workers: list[Any], indices: dict[int, Sequence[int]], row_name: Any) -> None:
        self.workers, self.indices, self.row_name = workers, indices, row_name
        self.task_info: dict[int, tuple] = {}

    def rows(self, worker: int) -> list[str]:
        """Names of the rows of every step sent to ``worker`` and not received back."""
        names: list[str] = []
        for task, info in sorted(self.task_info.items()):
            if len(info) == 1 and info[0] == worker and task in self.indices:
                names.extend(self.name(i) for i in self.indices[task])
        return names

    def name(self, index: int) -> str:
        real = -index - 1 if index < 0 else index  # negative: a masked filler repeat of a row
        try:
            return self.row_name(real) if self.row_name is not None else f"index {real}"
        except Exception:  # noqa: BLE001 - a name is only for the message
            return f"index {real}"

    def describe(self, error: str, pids: set[int] | None = None) -> str | None:
        """The one-line message for a dead worker of this loader (``None``: none of its workers died)."""
        if "DataLoader worker" not in error:
            return None
        dead = [(i, w) for i, w in enumerate(self.workers) if not w.is_alive()]
        if pids:
            dead = [(i, w) for i, w in dead if w.pid in pids]
        else:  # workers shut down at the end of an epoch exit with 0
            dead = [(i, w) for i, w in dead if w.exitcode not in (0, None)]
        if not dead:
            return None
        worker, process = dead[0]
        rows = self.rows(worker)
        more = len(rows) - _SHOWN_ROWS
        shown = ", ".join(rows[:_SHOWN_ROWS]) + (f" and {more} more" if more > 0 else "")
        what = f"the steps of rows {shown}" if rows else "no step (it died between steps)"
        return (f"data loader worker {worker} (pid {process.pid}) {_ending(process.exitcode)} while building {what}; "
                "rerun with data.num_workers=0 to see the error in the main process")


class _GuardedIterator(_MultiProcessingDataLoaderIter):
    def __init__(self, loader: WorkerGuardedLoader) -> None:
        self._indices: dict[int, Sequence[int]] = {}
        self._pending_index: Sequence[int] | None = None
        self._row_name = loader.row_name
        super().__init__(loader)
        self._record = _Record(self._workers, self._indices, self._row_name)
        self._record.task_info = self._task_info
        _RECENT.append(self._record)

    def _next_index(self) -> Any:
        index = super()._next_index()
        self._pending_index = index
        return index

    def _try_put_index(self) -> None:
        sent = self._send_idx
        super()._try_put_index()
        if self._send_idx > sent and self._pending_index is not None:
            self._indices[sent] = self._pending_index
        self._pending_index = None
        record = getattr(self, "_record", None)
        if record is not None:
            record.task_info = self._task_info  # a new dict after a reset (persistent workers, new epoch)

    def __next__(self) -> Any:
        try:
            item = super().__next__()
        except RuntimeError as e:
            message = self._record.describe(str(e))
            if message is None:
                raise
            raise WorkerDiedError(message) from None
        for task in [t for t in self._indices if t < self._rcvd_idx]:  # received: no longer needed for a message
            del self._indices[task]
        return item


def guarded_loader(dataset: Any, rows: Sequence[dict[str, Any]], **kwargs: Any) -> WorkerGuardedLoader:
    """A ``WorkerGuardedLoader`` over ``dataset`` whose index ``i`` is ``rows[i]`` (named by its ``row_id``)."""
    loader = WorkerGuardedLoader(dataset, **kwargs)
    loader.row_name = lambda i: str(rows[i].get("row_id", f"index {i}"))
    return loader


def _ending(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        return f"was killed by signal {signal_ending(code)}"
    return f"exited with status {code}"


def describe_worker_failure(error: BaseException) -> str | None:
    """The one-line message for PyTorch's error about a dead worker of a guarded loader, else ``None``.

    The error's chain is searched too: the SIGCHLD handler raises wherever the main process is, and code there may
    wrap it (``inspect`` turns it into ``TypeError('unsupported callable')`` raised from it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        message = _describe_one(error)
        if message is not None:
            return message
        error = error.__cause__ or error.__context__
    return None


def _describe_one(error: BaseException) -> str | None:
    if isinstance(error, WorkerDiedError):
        return str(error)
    text = str(error)
    if not isinstance(error, RuntimeError) or "DataLoader worker" not in text:
        return None
    named = re.search(r"pid(?:\(s\))? ([\d, ]+)", text)
    pids = {int(p) for p in re.findall(r"\d+", named.group(1))} if named else set()
    for record in reversed(_RECENT):
        message = record.describe(text, pids)
        if message is not None:
            return message
    return None
