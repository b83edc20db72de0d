"""A disk cache of tokenised rows: a second run (another objective, learning rate or ``seed_everything``
of a sweep, a resumed job) reads its rows back instead of reading and tokenising the source again.

An entry is keyed by everything that decides the rows:

* the source: a local file or directory by path, size and modification time of every data file in it;
  a hub dataset by id, split and configuration name (a new upstream revision under the same id is
  *not* noticed: pass ``data.cache=false`` or a local copy when that matters);
* the tokenizer: its full serialisation (vocabulary, merges, normaliser, pre-tokeniser), chat template
  and special tokens;
* the data module: its class and every public JSON-serialisable setting (fields, prompt template,
  max length, over-long policy, sampling size, ...), minus those that only batch or check the rows
  (``NOT_KEYED``: ``strict`` is one, a strict run checks the entry's drops instead). ``data.seed`` is
  keyed even when nothing is sampled, so a run with another data seed tokenises again;
* the data code: a hash of ``dft_lightning/data/*.py`` and of the files that define a data module
  subclass of your own, so a change to conversion rules never serves rows built by the old ones.

An entry holds the rows (token ids as one flat int32 tensor with offsets, a supervised-token mask, row ids) and the
split's ``DataReport``; it is written to a temporary file and renamed, so concurrent ranks building the
same entry on a shared filesystem cannot leave a torn file, and a lock file beside it lets one process
(the first rank) tokenise while the others wait and read its entry. Entries live under
``$DFT_LIGHTNING_CACHE/tokenised`` and are never evicted (``rm -r`` that folder to reclaim space).

Not handled here: rows that carry more than ``input_ids``/``labels``/``row_id`` (image rows: the vision
module does not cache), eviction, sharing entries across package versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from dft_lightning.data.chat import IGNORE_INDEX, DataReport
from dft_lightning.paths import save_torch_atomic

__all__ = ["ROW_KEYS", "cache_key", "load_rows", "read_or_build", "save_rows"]

ROW_KEYS = ("input_ids", "labels", "row_id")
FORMAT = 1
#: data module attributes that only batch or check rows (or name the tokenizer, keyed by its content instead)
NOT_KEYED = frozenset({
    "batch_size", "micro_batch_size", "num_workers", "packing", "pack_length", "val_fraction", "strict", "cache",
    "datasets", "reports", "tokenizer", "tokenizer_spec", "prepare_data_per_node",
    "allow_zero_length_dataloader_with_multiple_devices",
})


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parent.parent / "rows.py"]:  # + reader
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def source_fingerprint(source: str, split: str, subset: str | None) -> dict[str, Any]:
    from dft_lightning.rows import is_row_file, looks_local

    if not looks_local(source):
        return {"hub": source, "split": split, "subset": subset}
    path = Path(source).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if is_row_file(p.name)) if path.is_dir() else [path]
    return {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()]}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return digest.hexdigest()


def class_code(module: Any) -> str:
    """A hash of the files defining the module's classes outside this package (a user's data module)."""
    digest = hashlib.sha256()
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("dft_lightning.", "lightning.", "builtins")):
            continue
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:
            source = None
        digest.update(Path(source).read_bytes() if source and Path(source).is_file() else cls.__qualname__.encode())
    return digest.hexdigest()


def template_fingerprint(module: Any) -> str | None:
    """A hash of the text of the module's ``chat_template`` when it names a ``.jinja`` file (its path alone is in
    the settings: an edited file must miss)."""
    choice = getattr(module, "chat_template", None)
    if isinstance(choice, str) and choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def module_settings(module: Any) -> dict[str, Any]:
    """The data module's public settings that can be written as JSON (dataclasses as dicts), and the text's hash
    of a ``.jinja`` chat template file."""
    settings: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}",
                                "class_code": class_code(module)}
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or name in NOT_KEYED:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        try:
            settings[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    template = template_fingerprint(module)
    if template is not None:
        settings["chat_template_text"] = template
    return settings


def cache_key(module: Any, source: str, split: str, sample: int | None) -> str:
    parts = {
        "code": code_fingerprint(),
        "source": source_fingerprint(source, split, getattr(module, "subset", None)),
        "split": split,
        "sample": sample,
        "tokenizer": tokenizer_fingerprint(module.tokenizer),
        "module": module_settings(module),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.pt"


@contextlib.contextmanager
def build_lock(path: Path, on_wait: Any = None) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (``<entry>.lock``), so one process builds an entry while the
    others wait and then read it. ``on_wait()`` runs before blocking. Where the filesystem has no locks
    every process builds (the entry is still written atomically)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - closed below
    except OSError:  # an unwritable cache: build without it
        yield
        return
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no locking here (some network filesystems)
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


def read_or_build(path: Path, build: Any, on_wait: Any = None, on_unsaved: Any = None) -> tuple[list, DataReport, bool]:
    """The entry at ``path``, or ``build()``'s rows and report, saved there; the last item says whether they
    came from the cache. One process builds while the others wait on the lock, then read its entry.
    ``on_unsaved(error)`` is told when the entry cannot be written (the rows are returned all the same)."""
    hit = load_rows(path)
    if hit is None:
        with build_lock(path, on_wait=on_wait):
            hit = load_rows(path)
            if hit is None:
                rows, report = build()
                try:
                    save_rows(path, rows, report)
                except OSError as e:
                    if on_unsaved is not None:
                        on_unsaved(e)
                return rows, report, False
    return (*hit, True)


def save_rows(path: Path, rows: list[dict[str, Any]], report: DataReport) -> None:
    lengths = [len(r["input_ids"]) for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32)
    labels = torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.int32)
    supervised = labels != IGNORE_INDEX
    exact = bool(torch.equal(labels[supervised], ids[supervised]))  # labels are the ids or ignored: 1 byte each
    payload = {
        "format": FORMAT,
        "input_ids": ids,
        "supervised" if exact else "labels": supervised if exact else labels,
        "offsets": offsets,
        "row_ids": [r["row_id"] for r in rows],
        "report": {**dataclasses.asdict(report), "dropped": dict(report.dropped)},
    }
    save_torch_atomic(payload, path)


def load_rows(path: Path) -> tuple[list[dict[str, Any]], DataReport] | None:
    """The cached rows and report, or ``None`` when there is no readable entry."""
    try:
        payload = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
        return None
    if payload.get("format") != FORMAT:
        return None
    if "supervised" in payload:
        flat = payload["input_ids"]
        labels_t = torch.where(payload["supervised"], flat, torch.full_like(flat, IGNORE_INDEX))
    else:
        labels_t = payload["labels"]
    ids, labels, offsets = payload["input_ids"].tolist(), labels_t.tolist(), payload["offsets"].tolist()
    rows = [{"input_ids": ids[a:b], "labels": labels[a:b], "row_id": row_id}
            for a, b, row_id in zip(offsets[:-1], offsets[1:], payload["row_ids"], strict=True)]
    fields = dict(payload["report"])
    fields["dropped"] = Counter(fields["dropped"])
    return rows, DataReport(**fields)
