"""Helpers shared by the instrument scripts (token_probs, plot_curves, sweep, compare).

- Reading logged metrics: Lightning ``CSVLogger`` files (``metrics.csv``) and W&B offline runs
  (``wandb/offline-run-*/run-*.wandb``, read record by record: the file is W&B's block log of protobuf
  records, decoded with the ``wandb`` package's own protobuf classes, no network and no W&B process).
  Both give ``{metric: [(step, value), ...]}``; the step is Lightning's ``trainer/global_step`` when W&B
  has it, else W&B's own ``_step``.
- ``label=path`` arguments, Markdown tables, matplotlib without a display, one-line errors.

Not handled here: W&B runs that were synced and deleted locally (read them with ``wandb.Api``), W&B
tables, media or histograms as curves (only scalar values are returned).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

WANDB_HEADER = b":W&B"
WANDB_BLOCK = 32768
WANDB_RECORD_HEADER = 7  # crc32 (4 bytes), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


from dft_lightning.plotting import Series, number, pyplot, read_csv_metrics  # noqa: E402, F401  (shared with the tools)


class ToolError(Exception):
    """A problem with the user's input: reported as one ``error:`` line."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_main(main, argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; ``ToolError`` and the package's ``UserError`` end in one ``error:`` line."""
    from dft_lightning.errors import UserError

    try:
        main(argv)
    except (ToolError, UserError) as e:
        fail(str(e))


def split_label(spec: str, default: str | None = None) -> tuple[str, str]:
    """``"label=path"`` -> ``(label, path)``; a bare ``path`` is labelled ``default`` or by the path itself."""
    label, sep, rest = spec.partition("=")
    if sep and label and "/" not in label:
        return label, rest
    return (default or spec), spec


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else "-"
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- W&B offline runs ------------------------------------------------------------------------------
def wandb_records(path: str | Path) -> Iterator[Any]:
    """The protobuf ``Record``s of a ``.wandb`` file, in order; stops at a truncated tail (a run still writing)."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError as e:
        raise ToolError("reading W&B runs needs the wandb package") from e
    data = Path(path).read_bytes()
    if data[:4] != WANDB_HEADER:
        raise ToolError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + WANDB_RECORD_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_RECORD_HEADER:  # the end of a block too short for a header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_RECORD_HEADER])
        start = pos + WANDB_RECORD_HEADER
        chunk = data[start : start + length]
        if len(chunk) < length or (zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF) != crc:
            return
        pos = start + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        else:
            return
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_metrics(path: str | Path) -> Series:
    """``{metric: [(step, value), ...]}`` of the scalar history of a W&B offline run (a run dir or its ``.wandb``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise ToolError(f"{path}: no .wandb file in this W&B run directory")
        path = files[0]
    series: Series = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = ".".join(item.nested_key) if item.nested_key else item.key
            try:
                row[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                continue
        step = row.get("trainer/global_step", row.get("_step"))
        if not isinstance(step, int | float):
            continue
        for key, value in row.items():
            if key.startswith("_") or key == "trainer/global_step" or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, []).append((float(step), float(value)))
    return series


def find_logs(path: str | Path, source: str = "auto") -> list[tuple[Path, str]]:
    """``(file, kind)`` for the logs under ``path`` (``kind``: ``csv`` or ``wandb``).

    A file is taken as it is; a directory is searched: ``source="auto"`` takes its ``metrics.csv`` files,
    or its W&B runs when it has none (a run logged to both would otherwise appear twice).
    """
    path = Path(path)
    if not path.exists():
        raise ToolError(f"{path}: no such file or directory")
    if path.is_file():
        kind = "wandb" if path.suffix == ".wandb" else "csv"
        return [(path, kind)]
    csvs = [(p, "csv") for p in sorted(path.rglob("metrics.csv"))]
    runs = [(p, "wandb") for p in sorted(path.rglob("*.wandb"))]
    if source == "csv":
        return csvs
    if source == "wandb":
        return runs
    return csvs or runs


def read_metrics(path: Path, kind: str) -> Series:
    return read_wandb_metrics(path) if kind == "wandb" else read_csv_metrics(path)


def last_value(series: Series, key: str) -> float | None:
    points = series.get(key) or []
    return points[-1][1] if points else None
