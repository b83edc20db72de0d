"""The files of the offline-RL data builder (``tools/build_offline_rl.py``): crash-safe JSON-lines parts, the
manifest of done questions, and the yield report computed from the manifests.

Layout under the output folder ``OUT`` (shard ``i`` of ``n``; ``part = part-0000i-of-0000n``)::

    OUT/build.json                     the settings every shard must share (checked on every start)
    OUT/train/<part>.jsonl             correct responses, one row each (MathDataModule reads OUT/train)
    OUT/pairs/<part>.jsonl             chosen / rejected pairs (with --pairs)
    OUT/state/<part>.manifest.jsonl    one line per finished question (grades, counts) or skipped row
    OUT/state/<part>.done.json         written when the shard has finished all its questions
    OUT/state/<part>.report.json       the shard's own yield report
    OUT/state/<part>.lock              held while the shard runs
    OUT/report.json                    the report over every shard's manifest (``--merge`` rewrites it)

Crash safety. Every write appends complete lines in one ``write`` call followed by flush and fsync; per chunk
of questions the training rows are written first, then the pairs, then the questions' manifest lines. A question
is done only once its manifest line is on disk. On a restart ``ShardStore.recover``

* cuts a trailing partial line (a kill in the middle of a write) from every file, and
* cuts the rows of questions that have no manifest line from the end of the training and pair files (they were
  written before the kill reached the manifest; they are generated again, with the same seeds).

So a rerun neither duplicates nor loses rows, and a rerun of a finished build does nothing. Not handled: a
file system whose fsync does not reach the disk; two processes running the *same* shard at once is refused by
an exclusive ``flock`` on the lock file, which some network file systems do not honour.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dft_lightning.paths import write_file_atomic

NONE = "(none)"
EXAMPLES = 50  # skipped rows named in report.json (all of them are in the manifests)


class StoreError(Exception):
    """Files under the output folder that this builder cannot continue from."""


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


class JsonlPart:
    """An append-only JSON-lines file whose rows carry the ``index`` of their question."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` as complete lines in one write, then flush and fsync."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not text:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _complete_lines(self, repair: bool = True) -> tuple[list[bytes], int]:
        """The file's complete lines and the length of a trailing partial one, which ``repair`` cuts from the file
        (only the shard's own process may: another shard's file can be in the middle of a write)."""
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if repair and end < len(data):
            os.truncate(self.path, end)
        return data[:end].splitlines(keepends=True), len(data) - end

    def _parse(self, lineno: int, line: bytes) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.path}:{lineno}: not a JSON line ({e.msg}); not written by this builder?") from e
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise StoreError(f"{self.path}:{lineno}: a row without an integer 'index'; not written by this builder?")
        return row

    def read(self, repair: bool = True) -> tuple[list[dict[str, Any]], int]:
        """All complete rows and the length of a trailing partial line (cut from the file when ``repair``: only
        by the process holding the shard's lock)."""
        lines, cut = self._complete_lines(repair)
        return [self._parse(n, line) for n, line in enumerate(lines, start=1)], cut

    def keep_done(self, done: set[int]) -> tuple[int, int]:
        """Cut the rows of questions not in ``done`` from the end of the file (and a trailing partial line first);
        returns (rows cut, partial bytes cut).

        They can only be at the end (rows are written before their manifest lines), so a row of a done question
        after one of an unfinished question means the file was changed by something else: ``StoreError``."""
        lines, partial = self._complete_lines()
        offset, cut_at, dropped = 0, None, 0
        for lineno, line in enumerate(lines, start=1):
            if self._parse(lineno, line)["index"] in done:
                if cut_at is not None:
                    raise StoreError(f"{self.path}:{lineno}: a row of a finished question after rows of an "
                                     "unfinished one; the file was not written by this builder")
            else:
                cut_at = offset if cut_at is None else cut_at
                dropped += 1
            offset += len(line)
        if cut_at is not None:
            os.truncate(self.path, cut_at)
        return dropped, partial


class ShardStore:
    """The files of one shard (see the module docstring); holds the shard's lock while open."""

    def __init__(self, out: Path, index: int, count: int, pairs: bool) -> None:
        self.out, self.index, self.count, self.part = out, index, count, part_name(index, count)
        for sub in ("train", "state", *(("pairs",) if pairs else ())):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.train = JsonlPart(out / "train" / f"{self.part}.jsonl")
        self.pairs = JsonlPart(out / "pairs" / f"{self.part}.jsonl") if pairs else None
        self.manifest = JsonlPart(out / "state" / f"{self.part}.manifest.jsonl")
        self.done_file = out / "state" / f"{self.part}.done.json"
        self.report_file = out / "state" / f"{self.part}.report.json"
        self._lock = (out / "state" / f"{self.part}.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"shard {index}/{count} of {out} is being built by another process") from None

    def recover(self) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        """The done questions (manifest entries by index) and what was cut to get back to a consistent state."""
        entries, cut = self.manifest.read()
        done = {entry["index"]: entry for entry in entries}
        fixes = {"partial_lines": int(cut > 0), "rows_dropped": 0, "pairs_dropped": 0}
        for part, key in ((self.train, "rows_dropped"), (self.pairs, "pairs_dropped")):
            if part is not None:
                fixes[key], partial = part.keep_done(set(done))
                fixes["partial_lines"] += int(partial > 0)
        return done, fixes

    def close(self) -> None:
        self._lock.close()


# ----------------------------------------------------------------------------------------------------- report


def _bucket() -> dict[str, float]:
    return {"questions": 0, "samples": 0, "correct": 0, "rows": 0, "pairs": 0, "solved": 0}


def _add(bucket: dict[str, float], entry: dict[str, Any]) -> None:
    correct = sum(entry["correct"])
    bucket["questions"] += 1
    bucket["samples"] += len(entry["correct"])
    bucket["correct"] += correct
    bucket["rows"] += entry["rows"]
    bucket["pairs"] += entry["pairs"]
    bucket["solved"] += int(correct > 0)


def _rates(bucket: dict[str, float]) -> dict[str, float]:
    samples, questions = max(bucket["samples"], 1), max(bucket["questions"], 1)
    return {**bucket, "accuracy": bucket["correct"] / samples, "yield": bucket["rows"] / samples,
            "solved_share": bucket["solved"] / questions}


def summarize(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The yield report of manifest entries: totals, by source, by correct samples out of k, by level, skips.

    ``accuracy`` is correct samples / samples, ``yield`` training rows / samples (correct ones, minus the
    truncated ones unless kept), ``solved_share`` the share of questions with at least one correct sample."""
    total, by_source, by_correct, by_level = _bucket(), {}, {}, {}
    skipped: dict[str, Any] = {"rows": 0, "by_reason": {}, "examples": []}
    for entry in sorted(entries, key=lambda e: e["index"]):
        if entry["status"] == "skipped":
            skipped["rows"] += 1
            skipped["by_reason"][entry["reason"]] = skipped["by_reason"].get(entry["reason"], 0) + 1
            if len(skipped["examples"]) < EXAMPLES:
                skipped["examples"].append({k: entry[k] for k in ("row", "reason", "detail")})
            continue
        _add(total, entry)
        _add(by_source.setdefault(str(entry.get("source") or NONE), _bucket()), entry)
        _add(by_correct.setdefault(f"{sum(entry['correct'])}/{len(entry['correct'])}", _bucket()), entry)
        if entry.get("level") is not None:
            _add(by_level.setdefault(str(entry["level"]), _bucket()), entry)
    order = sorted(by_correct, key=lambda key: tuple(int(x) for x in key.split("/")))
    return {
        **_rates(total),
        "by_source": {name: _rates(b) for name, b in sorted(by_source.items())},
        "by_correct": {name: _rates(by_correct[name]) for name in order},
        "by_level": {name: _rates(b) for name, b in sorted(by_level.items())},
        "skipped": skipped,
    }


def combined_report(out: Path, count: int) -> dict[str, Any]:
    """The report over every shard's manifest under ``out``, with which shards have finished."""
    entries: list[dict[str, Any]] = []
    finished, missing = [], []
    for index in range(count):
        manifest = out / "state" / f"{part_name(index, count)}.manifest.jsonl"
        if manifest.exists():
            entries += JsonlPart(manifest).read(repair=False)[0]  # other shards may be writing theirs
        (finished if (out / "state" / f"{part_name(index, count)}.done.json").exists() else missing).append(index)
    return {**summarize(entries), "shards": {"count": count, "finished": finished, "unfinished": missing},
            "complete": not missing}


def _table(title: str, buckets: dict[str, dict[str, float]]) -> list[str]:
    if not buckets:
        return []
    width = max(len(title), *(len(name) + 2 for name in buckets))
    cols = ("questions", "samples", "correct", "rows", "pairs", "solved", "accuracy", "yield")
    lines = [title.ljust(width) + "".join(c.rjust(10) for c in cols)]
    for name, b in buckets.items():
        cells = [f"{b[c]:.3f}" if c in ("accuracy", "yield") else str(int(b[c])) for c in cols]
        lines.append(f"  {name}".ljust(width) + "".join(cell.rjust(10) for cell in cells))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text tables."""
    lines = [f"{report['questions']} questions, {report['samples']} samples, {report['correct']} correct "
             f"(accuracy {report['accuracy']:.3f}), {report['rows']} training rows (yield {report['yield']:.3f}), "
             f"{report['pairs']} pairs, {report['solved']} questions with a correct sample"]
    lines += _table("by source", report["by_source"])
    lines += _table("by correct samples", report["by_correct"])
    lines += _table("by level", report["by_level"])
    skipped = report["skipped"]
    if skipped["rows"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped["by_reason"].items()))
        lines.append(f"skipped rows: {skipped['rows']} ({reasons})")
        lines += [f"  {e['row']}: {e['reason']} ({e['detail']})" for e in skipped["examples"][:10]]
        if skipped["rows"] > 10:
            lines.append(f"  ... {skipped['rows'] - 10} more: report.json names {EXAMPLES}, the manifests all")
    shards = report.get("shards")
    if shards and shards["count"] > 1:
        state = "all finished" if report["complete"] else f"unfinished: {shards['unfinished']}"
        lines.append(f"shards: {shards['count']} ({state})")
    return "\n".join(lines)
