"""Precomputed reference log-probs: the reference model run once over the tokenised rows, read back by training.

``precompute`` (``tools/precompute_reference.py``) runs a reference model over every tokenised row of a
data module (the training rows, and the validation / test rows when there are any), length-sorted in
micro-batches under ``no_grad``, through the same chunked statistics as training
(``CausalLMWithTokenStats``), and writes the log-probability of each supervised target token with a
fingerprint: the tokenizer (``data.cache.tokenizer_fingerprint``: its vocabulary, merges, chat template,
special tokens), the rows (a digest of every row's token ids and labels, the ``rows`` hash being over
all of them in a fixed order), the data module's settings (max length, prompt template, ...) and the
reference model (its spec, a hash of its weights, dtype and precision). The file is written to a
temporary name and renamed.

Training with ``model.reference: precomputed:<file>`` loads and runs no reference model:
``FineTuneModule.setup`` calls ``PrecomputedReference.attach``, which gives each row of the data module
its values (``row["ref_logp"]``), looked up by the row's content digest, so the order, the shuffle, a
``data.max_samples`` subset or another split of the same rows do not matter. The collators put them into
``MicroBatch.ref_logp`` aligned with the labels (packed rows too), and ``TokenStats.ref_logp`` is read
from there. Refused, each with one line (``UserError``): a tokenizer other than the file's, rows the file
has under the same row id but tokenised differently, rows it does not have at all, an objective that
needs more of the reference than its target log-probs (``kl_reference``: the full next-token
distribution) and ``model.reference_update`` (a moving reference cannot be computed in advance).

Not handled here: image rows (their content digest would not cover the images), references that move.
"""

from __future__ import annotations

import array
import datetime
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dft_lightning.batch import IGNORE_INDEX
from dft_lightning.errors import UserError
from dft_lightning.paths import save_torch_atomic

PREFIX = "precomputed:"
FORMAT = 1
ROW_KEYS = frozenset({"input_ids", "labels", "row_id", "ref_logp"})
TOOL = "tools/precompute_reference.py"


def precomputed_path(reference: str | None) -> Path | None:
    """The file of ``model.reference: precomputed:<file>``, or ``None`` for any other reference."""
    if reference is None or not reference.startswith(PREFIX):
        return None
    path = reference[len(PREFIX):].strip()
    if not path:
        raise UserError(f"model.reference={reference!r} names no file: write precomputed:<path> ({TOOL} writes it)")
    return Path(path).expanduser()


def row_key(row: dict[str, Any]) -> str:
    """A digest of the row's token ids and labels (what decides its reference log-probs)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(array.array("q", row["input_ids"]).tobytes())
    digest.update(b"|")
    digest.update(array.array("q", row["labels"]).tobytes())
    return digest.hexdigest()


def rows_hash(keys: Iterable[str]) -> str:
    """One digest over row digests, independent of their order."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()


def check_compatible(objective: Any, reference_update: Any, reference: str) -> None:
    """One-line errors for what precomputed reference log-probs cannot serve."""
    from dft_lightning.tokens import STATISTICS

    if reference_update is not None:
        raise UserError(f"model.reference_update with model.reference={reference}: a moving reference cannot be "
                        "precomputed; drop one of the two")
    needs = sorted(n for n in getattr(objective, "requires", ()) if n in STATISTICS and STATISTICS[n].needs_reference)
    if needs:
        raise UserError(f"model.reference={reference}: objective {type(objective).__name__} needs the reference's full "
                        f"next-token distribution ({', '.join(needs)}), which precomputed target log-probs do not "
                        "hold; leave model.reference unset or name a model")


def supervised_values(logp: Tensor, labels: Sequence[int]) -> Tensor:
    """The values of ``logp`` (``[time - 1]``, aligned with ``labels[1:]``) at the supervised targets."""
    targets = torch.tensor(labels[1:]) != IGNORE_INDEX
    return logp[: len(labels) - 1][targets.to(logp.device)]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _micro_batches(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


@torch.no_grad()
def precompute(
    datamodule: Any, reference: str, output: str | Path, *, dtype: str = "float32",
    attn_implementation: str | None = None, chunk_size: int | None = None, micro_batch_size: int = 8,
    device: str | torch.device = "cpu", forward_context: Any = None, precision: str | None = None,
    param_dtype: str | None = None, progress: bool = True,
) -> Path:
    """Run ``reference`` over every row of ``datamodule`` (set up) and write its target log-probs to ``output``.

    Args:
        datamodule: a ``ChatDataModule`` after ``setup`` (its ``datasets`` and ``tokenizer``).
        reference: the reference model (any ``model.pretrained`` spec).
        output: the file to write (replaced atomically).
        dtype, attn_implementation, chunk_size: as the ``model.`` keys of the run that will read the file.
        micro_batch_size: rows per forward.
        device: where the reference runs.
        forward_context: a callable returning the context training runs forwards in (e.g. the Lightning
            precision plugin's ``forward_context``, autocast for ``bf16-mixed``); default: none.
        precision: the name of that precision (``trainer.precision``), recorded in the fingerprint.
        param_dtype: cast the reference to this dtype first (``model.fsdp_param_dtype``).
        progress: show progress (``dft_lightning.progress``: a live line on a terminal, plain lines in a log).
    """
    from dft_lightning import modeling
    from dft_lightning.data.batching import pad_rows
    from dft_lightning.data.cache import module_settings, tokenizer_fingerprint
    from dft_lightning.progress import Progress

    if micro_batch_size < 1:
        raise UserError(f"micro_batch_size={micro_batch_size} must be positive")
    splits = {name: rows for name, rows in datamodule.datasets.items() if rows}
    if not splits:
        raise UserError("the data module holds no rows (run its setup first)")
    for name, rows in splits.items():
        _refuse_other_rows(rows, name)
    unique: dict[str, dict[str, Any]] = {}
    for rows in splits.values():
        for row in rows:
            unique.setdefault(row_key(row), row)
    lm = modeling.load_causal_lm(reference, dtype, attn_implementation)
    weights = weights_hash(lm)
    if param_dtype:
        lm = lm.to(getattr(torch, param_dtype))
    model = modeling.CausalLMWithTokenStats(lm, chunk_size).requires_grad_(False).eval().to(device)
    pad_id = datamodule.tokenizer.pad_token_id
    keys, values, offsets = list(unique), [], [0]
    results: dict[str, Tensor] = {}
    context = forward_context or nullcontext
    todo = list(unique.values())
    with Progress("reference log-probs", len(todo), "rows", enabled=progress) as bar:
        for group in _micro_batches(todo, micro_batch_size):
            mb = pad_rows(group, pad_id).to(device)
            ctx: AbstractContextManager = context()
            with ctx:
                logp = model(mb)["logp"].float()
            for i, row in enumerate(group):
                results[row_key(row)] = supervised_values(logp[i], row["labels"]).cpu()
            bar.update(len(group))
    for key in keys:
        values.append(results[key])
        offsets.append(offsets[-1] + results[key].numel())
    payload = {
        "format": FORMAT,
        "fingerprint": {
            "tokenizer": tokenizer_fingerprint(datamodule.tokenizer),
            "tokenizer_name": str(getattr(datamodule, "tokenizer_spec", None) or
                                  getattr(datamodule.tokenizer, "name_or_path", "")),
            "rows": rows_hash(keys),
            "splits": {name: len(rows) for name, rows in splits.items()},
            "data": module_settings(datamodule),
            "reference": {"spec": reference, "weights_sha256": weights, "dtype": dtype, "param_dtype": param_dtype,
                          "attn_implementation": attn_implementation, "chunk_size": chunk_size,
                          "precision": precision},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "keys": keys,
        "row_ids": [unique[k].get("row_id") for k in keys],
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "ref_logp": torch.cat(values) if values else torch.zeros(0),
    }
    return save_torch_atomic(payload, output)


def _refuse_other_rows(rows: Iterable[dict[str, Any]], split: str) -> None:
    for row in rows:
        other = set(row) - ROW_KEYS
        if other:
            raise UserError(f"precomputed reference log-probs: {split} row {row.get('row_id')} carries "
                            f"{sorted(other)} beside its tokens (image rows are not supported)")


class PrecomputedReference:
    """A file written by ``precompute``: row digests, their target log-probs and the fingerprint."""

    def __init__(self, path: str | Path, payload: dict[str, Any], spec: str | None = None) -> None:
        self.path, self.spec = Path(path), spec or f"{PREFIX}{path}"
        self.fingerprint: dict[str, Any] = payload["fingerprint"]
        self.keys: list[str] = list(payload["keys"])
        self.row_ids: list[Any] = list(payload["row_ids"])
        self.offsets: list[int] = payload["offsets"].tolist()
        self.values: Tensor = payload["ref_logp"]
        self.index = {key: i for i, key in enumerate(self.keys)}

    @classmethod
    def load(cls, path: str | Path, spec: str | None = None) -> PrecomputedReference:
        spec = spec or f"{PREFIX}{path}"
        try:
            payload = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise UserError(f"model.reference={spec}: no such file; write it with {TOOL}") from None
        except Exception as e:  # noqa: BLE001 - anything unreadable is one line
            raise UserError(f"model.reference={spec}: not a readable precomputed reference file ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise UserError(f"model.reference={spec}: not a precomputed reference file of format {FORMAT} "
                            f"(write it again with {TOOL})")
        return cls(path, payload, spec)

    def describe(self) -> str:
        ref = self.fingerprint["reference"]
        return (f"reference log-probs of {ref['spec']} (weights sha256 {ref['weights_sha256'][:12]}) for "
                f"{len(self.keys)} rows, precomputed {self.fingerprint.get('created', '?')} ({self.path})")

    def values_of(self, key: str) -> Tensor | None:
        i = self.index.get(key)
        return None if i is None else self.values[self.offsets[i] : self.offsets[i + 1]]

    def attach(self, datamodule: Any) -> int:
        """Give every row of ``datamodule.datasets`` its ``ref_logp``; returns the rows attached.

        Raises ``UserError`` (one line) for another tokenizer, rows tokenised differently, missing rows.
        """
        from dft_lightning.data.cache import module_settings, tokenizer_fingerprint

        datasets = getattr(datamodule, "datasets", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if not isinstance(datasets, dict) or tokenizer is None:
            raise UserError(f"model.reference={self.spec} needs a set-up ChatDataModule (its tokenised rows); got "
                            f"{type(datamodule).__name__}")
        if tokenizer_fingerprint(tokenizer) != self.fingerprint["tokenizer"]:
            name = getattr(datamodule, "tokenizer_spec", None) or getattr(tokenizer, "name_or_path", "?")
            raise UserError(f"model.reference={self.spec}: the data's tokenizer ({name}) is not the one the reference "
                            f"log-probs were computed with ({self.fingerprint.get('tokenizer_name')}); run {TOOL} "
                            "again with this config")
        known_ids = set(self.row_ids)
        attached = 0
        for split, rows in sorted(datasets.items(), key=lambda item: (item[0] != "train", item[0])):
            _refuse_other_rows(rows, split)
            missing, changed = [], []
            for row in rows:
                values = self.values_of(row_key(row))
                if values is None:
                    (changed if row.get("row_id") in known_ids else missing).append(row.get("row_id"))
                    continue
                row["ref_logp"] = values
                attached += 1
            if changed:
                differ = _settings_diff(self.fingerprint.get("data", {}), module_settings(datamodule))
                raise UserError(f"model.reference={self.spec}: {len(changed)} of {len(rows)} {split} rows (e.g. "
                                f"{', '.join(map(str, changed[:3]))}) are tokenised differently from the rows the "
                                f"reference log-probs were computed for ({differ}); run {TOOL} again with this config")
            if missing:
                raise UserError(f"model.reference={self.spec}: {len(missing)} of {len(rows)} {split} rows (e.g. "
                                f"{', '.join(map(str, missing[:3]))}) have no precomputed reference log-probs (the "
                                f"file holds {len(self.keys)} rows of other data); run {TOOL} with this config")
        return attached


def _settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> str:
    names = sorted(k for k in saved.keys() | current.keys() if k != "class_code" and saved.get(k) != current.get(k))
    if not names:
        return "the data settings are the same: the source rows changed"
    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    shown = "; ".join(f"{k}: {short(saved.get(k))} then, {short(current.get(k))} now" for k in names[:3])
    return f"data settings that differ: {shown}"
