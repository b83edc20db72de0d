"""A callback for tests that records which source rows each optimizer step trains on, per rank.

``RowLog(path)`` appends one JSON line per training step to ``<path>.rank<r>``: the global step the batch
is for (steps taken before it) and the row ids of its supervised records (filler rows left out).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RowLog(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = [r for mb in batch for r in mb.row_ids if r is not None]
        with Path(f"{self.path}.rank{trainer.global_rank}").open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": rows}) + "\n")


def read_row_log(path: str | Path) -> dict[int, list]:
    """``{step: sorted row ids of that step over all ranks}`` from every ``<path>.rank*`` file."""
    steps: dict[int, list] = {}
    for file in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).extend(entry["rows"])
    return {step: sorted(rows, key=str) for step, rows in sorted(steps.items())}
