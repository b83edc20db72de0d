"""The one row reader: raw rows from local json / jsonl / parquet files (or directories of them) or a hub dataset.

Training data (``dft_lightning.data``) and benchmarks (``dft_lightning.evaluation.benchmarks``) both read through
``iter_rows``; it sits beneath both, so evaluation does not import the training data layer.

Every row comes with an id naming where it is: ``train.jsonl:7`` (file name and 1-based line of a JSON-lines
file), ``rows.json:3`` / ``rows.parquet:3`` (0-based index in a JSON array or a parquet file) or
``<hub id>[<split>]:<index>``. Local files are read here, not through ``datasets``, so that ids name lines and a
bad line is not an opaque parser error:

* a JSON line that does not parse comes as ``BadRow("malformed_json", <parser message>)``;
* a row that is not a JSON object (a list, a number, a string) comes as ``BadRow("not_an_object", <type>)``.

The caller decides what a bad row costs: the data modules drop it and count it in their report (``data.strict``
turns it into an error), ``read_rows`` (benchmarks, whose problem sets must be whole) raises naming the row.

File layouts: ``.jsonl`` is JSON lines; ``.json`` is a JSON array of rows, an object keeping the rows under one
of ``WRAPPER_KEYS`` (``{"data": [...]}``, ``{"test": [...]}``; its other keys are ignored), or JSON lines
(``datasets``' ``to_json`` writes those); any file starting with ``[`` is read as one JSON array. Gzipped files
(``.jsonl.gz``, ``.json.gz``, or any of them with gzip's magic bytes) are read the same. A directory means every
such file below it, in sorted path order. Not handled: streaming datasets that do not fit in memory, remote
files by URL, CSV (a file of any other suffix is refused, naming it).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dft_lightning.errors import DataError

__all__ = [
    "LOCAL_SUFFIXES",
    "WRAPPER_KEYS",
    "BadRow",
    "SourceNotFoundError",
    "is_row_file",
    "iter_rows",
    "looks_local",
    "read_rows",
    "row_files",
]

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")
WRAPPER_KEYS = ("data", "rows", "examples", "problems", "train", "validation", "test")


@dataclass(frozen=True)
class BadRow:
    """A row that could not be used as read: ``reason`` is ``malformed_json`` or ``not_an_object``."""

    reason: str
    detail: str = ""


class SourceNotFoundError(DataError, FileNotFoundError):
    """A local source (file or directory) that is not there."""


def is_row_file(path: str | Path) -> bool:
    """Whether the name ends in one of ``LOCAL_SUFFIXES``."""
    return str(path).endswith(LOCAL_SUFFIXES)


def looks_local(source: str | Path) -> bool:
    """A path rather than a hub id: a row-file suffix, a leading ``.``/``/``/``~``, or something that exists."""
    text = str(source)
    return is_row_file(text) or text.startswith((".", "/", "~")) or Path(text).expanduser().exists()


def row_files(path: Path, key: str) -> list[Path]:
    """``path`` itself, or the row files below a directory in sorted order; ``DataError`` when there are none or
    ``path`` is a file of another format."""
    if not path.exists():
        raise SourceNotFoundError(f"{key}: data file not found: {path}")
    if not path.is_dir():
        if not is_row_file(path.name):
            raise DataError(f"{key}: {path}: unknown data format ({''.join(path.suffixes) or 'no suffix'}); give "
                            f"a {', '.join(LOCAL_SUFFIXES)} file or a directory of them")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_row_file(p.name))
    if not files:
        raise DataError(f"{key}: no .json/.jsonl/.parquet files in directory {path}")
    return files


def iter_rows(
    source: str | Path, *, key: str, split: str = "train", name: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield ``(row_id, row)``; a row is a dict, or a ``BadRow`` (see the module docstring).

    Args:
        source: a local file or directory of files, or a hub dataset id.
        key: what named ``source``, for error messages (``data.train``, a benchmark's name).
        split: hub split.
        name: hub configuration name.
    """
    if looks_local(source):
        for file in row_files(Path(source).expanduser(), key):
            yield from _iter_file(file, key)
        return
    yield from _iter_hub(str(source), key=key, split=split, name=name)


def read_rows(
    source: str | Path, *, key: str, split: str = "train", name: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """All ``(row_id, row)`` of ``source``; the first malformed line or non-object row raises ``DataError`` naming
    it (a benchmark with a row left out would score on fewer problems than it has)."""
    rows = []
    for row_id, row in iter_rows(source, key=key, split=split, name=name):
        if isinstance(row, BadRow):
            what = "not valid JSON" if row.reason == "malformed_json" else "not a JSON object"
            raise DataError(f"{key}: {row_id}: {what} ({row.detail})")
        rows.append((row_id, row))
    return rows


def _open(path: Path) -> IO[str]:
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open(encoding="utf-8")


def _checked(row_id: str, row: Any) -> tuple[str, Any]:
    return row_id, row if isinstance(row, dict) else BadRow("not_an_object", type(row).__name__)


def _iter_file(path: Path, key: str) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lazily; installed with datasets

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}:{i}", row
        return
    with _open(path) as f:
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
                yield _checked(f"{path.name}:{i}", row)
            return
        lines: Iterable[str] = f
        if first == "{" and path.name.removesuffix(".gz").endswith(".json"):
            text = f.read()
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                document = None  # JSON lines in a .json file
            wrapped = [k for k in WRAPPER_KEYS if isinstance(document, dict) and isinstance(document.get(k), list)]
            if len(wrapped) == 1:
                for i, row in enumerate(document[wrapped[0]]):
                    yield _checked(f"{path.name}:{i}", row)
                return
            lines = text.splitlines()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path.name}:{lineno}", BadRow("malformed_json", e.msg)
                continue
            yield _checked(f"{path.name}:{lineno}", row)


def _iter_hub(source: str, *, key: str, split: str, name: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, name, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the key that named the source
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key}: could not load {source!r} as a local file or hub dataset: {reason}") from e
    for i, row in enumerate(dataset):
        yield f"{source}[{split}]:{i}", dict(row)
