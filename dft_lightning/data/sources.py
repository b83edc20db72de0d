"""Read raw rows from local json / jsonl / parquet files or a hub dataset id.

Local files are read here (not through ``datasets``) so that every row has an id naming its file
and line, and a malformed JSON line is a counted, reported drop rather than an opaque parser error.
A hub id goes through ``datasets.load_dataset``; rows are then named ``<id>[<split>]:<index>``.

Not handled here: streaming datasets that do not fit in memory, remote files by URL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dft_lightning.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
MALFORMED = "malformed_json"


def _looks_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")) or Path(source).exists()


def iter_rows(source: str, *, key: str, split: str = "train", name: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(row_id, row)``; a malformed JSON line yields ``(row_id, MALFORMED)``.

    Args:
        source: a local file or directory of files, or a hub dataset id.
        key: the config key that named ``source`` (for error messages, e.g. ``data.train``).
        split: hub split.
        name: hub configuration name.
    """
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{key}: data file not found: {source}")
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{key}: no .json/.jsonl/.parquet files in directory {source}")
        for file in files:
            yield from _iter_file(file, key)
        return
    yield from _iter_hub(source, key=key, split=split, name=name)


def _iter_file(path: Path, key: str) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}:{i}", row
        return
    with path.open(encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # one JSON array
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{key}: {path} is not valid JSON: {e}") from e
            for i, row in enumerate(rows):
                yield f"{path.name}:{i}", row
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError:
                yield f"{path.name}:{lineno}", MALFORMED


def _iter_hub(source: str, *, key: str, split: str, name: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, name, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the key that named the source
        raise DataError(f"{key}: could not load {source!r} as a local file or hub dataset: {e}") from e
    for i, row in enumerate(dataset):
        yield f"{source}[{split}]:{i}", row
