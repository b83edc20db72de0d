"""``ChatDataModule``: the shared chat-SFT data path (sources -> records -> tokens -> step batches).

Domain modules (math, code, multimodal) subclass it and only change how raw rows become chats. At
``setup`` each split is read, converted, tokenised and reported (``DataReport``): rows read, kept,
truncated, dropped by reason with example row ids, token-length percentiles, supervised tokens.
``strict: true`` turns the first drop into an error naming the row. A field missing from every row
is a config mistake and raises at once, naming the field and the fields the rows do have.

Tokenised rows are cached between runs (``data.cache``; ``dft_lightning.data.cache`` keys and stores
them): one process tokenises a split while the other ranks wait and read its entry. A strict run
reading an entry built without ``strict`` raises on its first drop all the same.

Not handled here: sharding the tokenisation of one split across ranks or processes.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from dft_lightning.data.batching import PackedStepCollator, StepBatchSampler, StepCollator, StepDataset
from dft_lightning.data.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    DataReport,
    DropRow,
    FieldMap,
    chat_template,
    to_messages,
)
from dft_lightning.data.workers import guarded_loader
from dft_lightning.errors import DataError
from dft_lightning.rows import BadRow, iter_rows


class ChatDataModule(L.LightningDataModule):
    """Chat-SFT data from local json/jsonl/parquet files or a hub dataset.

    Args:
        train: training data: a file, a directory of files, or a hub dataset id.
        val: validation data, same forms; optional.
        test: data for the ``test`` command (default: the validation data).
        tokenizer: tokenizer spec; linked from ``model.pretrained`` by the CLI.
        split: hub split of ``train``.
        val_split: hub split of ``val``.
        subset: hub configuration name.
        val_fraction: when ``val`` is not given, hold out this fraction of training rows.
        fields: which row fields hold ``messages`` or ``prompt`` + ``response``.
        system_prompt: system message prepended to every chat without one.
        prompt_template: format string for the user turn built from the prompt field (``{prompt}``).
        max_length: maximum tokens per row.
        overlong: ``drop`` rows over ``max_length`` or ``truncate`` them (both counted).
        batch_size: rows per optimizer step, across all devices (the paper uses 256).
        micro_batch_size: rows per forward/backward pass on one device; accumulation follows.
        max_samples: keep this many training rows, drawn at random (with ``seed``) among the usable ones.
        seed: sampling and shuffling seed.
        strict: raise on the first dropped row instead of counting it.
        num_workers: data loader worker processes.
        packing: pack several records into each row (attention stays within a record); then
            ``micro_batch_size`` counts packed rows.
        pack_length: tokens per packed row (default ``max_length``).
        cache: keep the tokenised rows on disk (``$DFT_LIGHTNING_CACHE/tokenised``) and read them back when
            the source, tokenizer and settings are the same (``dft_lightning.data.cache`` says what counts).
        chat_template: how chats are rendered: unset, the tokenizer's own template (a tokenizer without one is
            an error); ``plain`` (``User:`` / ``Assistant:`` turns, for base models); a Jinja template; a
            ``.jinja`` file.
    """

    cacheable = True  # rows are input_ids / labels / row_id only

    def __init__(
        self, train: str, val: str | None = None, test: str | None = None, tokenizer: str | None = None,
        split: str = "train",
        val_split: str = "test", subset: str | None = None, val_fraction: float = 0.0,
        fields: FieldMap | None = None, system_prompt: str | None = None, prompt_template: str = "{prompt}",
        max_length: int = 2048, overlong: Literal["drop", "truncate"] = "drop", batch_size: int = 256,
        micro_batch_size: int = 4, max_samples: int | None = None, seed: int = 42, strict: bool = False,
        num_workers: int = 0, packing: bool = False, pack_length: int | None = None, cache: bool = True,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        if micro_batch_size < 1 or batch_size < 1:
            raise DataError("data.batch_size and data.micro_batch_size must be positive")
        if "{prompt}" not in prompt_template:
            raise DataError(f"data.prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        self.train, self.val, self.test, self.tokenizer_spec = train, val, test, tokenizer
        self.split, self.val_split, self.subset = split, val_split, subset
        self.val_fraction = val_fraction
        self.fields = fields or FieldMap()
        self.system_prompt, self.prompt_template = system_prompt, prompt_template
        self.max_length, self.overlong = max_length, overlong
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.max_samples, self.seed, self.strict, self.num_workers = max_samples, seed, strict, num_workers
        self.packing, self.pack_length = packing, pack_length or max_length
        self.cache, self.chat_template = cache, chat_template
        if self.packing and self.pack_length < max_length:
            raise DataError(f"data.pack_length={pack_length} is shorter than data.max_length={max_length}")
        self.tokenizer: Any = None
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        self.reports: dict[str, DataReport] = {}

    # -- conversion -------------------------------------------------------------------------
    def row_to_messages(self, row: Any) -> list[dict[str, str]]:
        """Raw row -> chat messages; domain modules override this. Raise ``DropRow`` to drop."""
        return to_messages(row, self.fields, system_prompt=self.system_prompt, prompt_template=self.prompt_template)

    def load_tokenizer(self) -> Any:
        from dft_lightning.pretrained import load_tokenizer

        if self.tokenizer_spec is None:
            raise DataError("data.tokenizer is not set (the CLI links it from model.pretrained)")
        return load_tokenizer(self.tokenizer_spec)

    def build(self, source: str, key: str, split: str, *, sample: int | None = None) -> tuple[list[dict], DataReport]:
        """Read, convert and tokenise one source, or read its rows back from the cache (``data.cache``,
        ``dft_lightning.data.cache``); returns the rows and their report."""
        if not (self.cache and self.cacheable):
            return self.tokenise(source, key, split, sample=sample)
        from dft_lightning.data import cache
        from dft_lightning.paths import cache_root

        path = cache.entry_path(cache_root() / "tokenised", cache.cache_key(self, source, split, sample))
        rows, report, cached = cache.read_or_build(
            path, lambda: self.tokenise(source, key, split, sample=sample),
            on_wait=lambda: print(f"{key}: waiting for another process to tokenise {source} ({path})", flush=True),
            on_unsaved=lambda e: rank_zero_warn(f"{key}: tokenised rows not cached ({e}); set DFT_LIGHTNING_CACHE "
                                                "to a writable folder, or data.cache=false"),
        )
        if cached:
            if self.strict and report.dropped:  # the entry was built without strict: its drops still count
                raise _strict_error(key, *_first_drop(report))
            rank_zero_info(f"{key}: {len(rows)} tokenised rows read back from the cache ({path})")
            self._warn_short(key, report)
        return rows, report

    def tokenise(
        self, source: str, key: str, split: str, *, sample: int | None = None
    ) -> tuple[list[dict], DataReport]:
        """Read, convert and tokenise one source; returns the rows and their report.

        With ``sample``, rows are converted in a seeded random order until ``sample`` of them are
        kept (dropped rows do not count), then kept in source order; fewer only when the source
        runs out, which is warned about.
        """
        report = DataReport(split=key.split(".")[-1])
        raw = list(iter_rows(source, key=key, split=split, name=self.subset))
        order: list[int] = list(range(len(raw)))
        if sample is not None and sample < len(raw):
            random.Random(self.seed).shuffle(order)
            report.sampled, report.source_rows = sample, len(raw)
        encoder = self.make_encoder()
        kept: list[tuple[int, dict[str, Any]]] = []
        for index in _progress(order, f"tokenising {key}"):
            if sample is not None and len(kept) >= sample:
                break
            row_id, row = raw[index]
            report.read += 1
            try:
                if isinstance(row, BadRow):  # a malformed JSON line, a row that is not an object
                    raise DropRow(row.reason, row.detail)
                encoded, truncated = self.encode_row(encoder, row)
            except DropRow as drop:
                if self.strict:
                    raise _strict_error(key, row_id, drop.reason, drop.detail) from None
                report.drop(row_id, drop.reason, drop.detail)
                continue
            labels = encoded["labels"]
            report.truncated += truncated
            report.prompt_lengths.append(next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels)))
            report.response_lengths.append(sum(t != IGNORE_INDEX for t in labels[1:]))
            kept.append((index, {**encoded, "row_id": row_id}))
        rows = [row for _, row in sorted(kept, key=lambda pair: pair[0])]
        report.kept = len(rows)
        self._check_schema(raw, report, source, key)
        self._warn_short(key, report)
        return rows, report

    @staticmethod
    def _warn_short(key: str, report: DataReport) -> None:
        if report.sampled is not None and report.kept < report.sampled:
            rank_zero_warn(f"{key}: data.max_samples={report.sampled} but only {report.kept} of the source's "
                           f"{report.source_rows} rows are usable")

    def make_encoder(self) -> ChatEncoder:
        template = chat_template(self.tokenizer, self.chat_template, what=f"data.tokenizer={self.tokenizer_spec}")
        return ChatEncoder(self.tokenizer, self.max_length, self.overlong, template)

    def encode_row(self, encoder: ChatEncoder, row: Any) -> tuple[dict[str, Any], bool]:
        """One raw row -> (``{"input_ids", "labels", ...}``, truncated); raises ``DropRow``."""
        ids, labels, truncated = encoder.encode(self.row_to_messages(row))
        return {"input_ids": ids, "labels": labels}, truncated

    def _check_schema(self, raw: list, report: DataReport, source: str, key: str) -> None:
        if report.read and report.dropped.get("missing_field", 0) == report.read:
            first = next((r for _, r in raw if isinstance(r, dict)), {})
            raise DataError(
                f"{key}={source}: {report.details['missing_field']} missing in all {report.read} rows "
                f"(row fields: {', '.join(sorted(first)) or 'none'}); set data.fields "
                f"(now {asdict(self.fields)})"
            )
        if report.kept == 0:
            reasons = ", ".join(f"{r}: {n} (e.g. {self_examples})" for r, n, self_examples in
                                ((r, n, ", ".join(report.examples[r][:3])) for r, n in report.dropped.items()))
            raise DataError(f"{key}={source}: no usable rows: {report.read} read, all dropped ({reasons or 'empty'})")

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.tokenizer = self.load_tokenizer()
        rows, report = self.build(self.train, "data.train", self.split, sample=self.max_samples)
        if self.val is not None:
            val_rows, val_report = self.build(self.val, "data.val", self.val_split)
            self.datasets["val"], self.reports["val"] = val_rows, val_report
        elif self.val_fraction > 0:
            order = list(range(len(rows)))
            random.Random(self.seed + 1).shuffle(order)
            n_val = max(1, int(len(rows) * self.val_fraction))
            held = set(order[:n_val])
            self.datasets["val"] = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        if self.test is not None:
            self.datasets["test"], self.reports["test"] = self.build(self.test, "data.test", self.val_split)
        self.datasets["train"], self.reports["train"] = rows, report
        for rep in self.reports.values():
            rank_zero_info(rep.summary())
        if len(rows) < self.batch_size and stage in (None, "fit"):
            raise DataError(
                f"data.batch_size={self.batch_size} but only {len(rows)} training rows are usable; "
                "lower data.batch_size or add data"
            )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, name: str, *, shuffle: bool, drop_last: bool, global_batch: int) -> DataLoader:
        rank, world = self._world()
        sampler = StepBatchSampler(
            len(self.datasets[name]), global_batch, rank=rank, world_size=world, shuffle=shuffle, seed=self.seed,
            drop_last=drop_last,
        )
        pad = self.tokenizer.pad_token_id
        collate = (
            PackedStepCollator(self.micro_batch_size, pad, self.pack_length) if self.packing
            else StepCollator(self.micro_batch_size, pad)
        )
        return guarded_loader(StepDataset(self.datasets[name]), self.datasets[name], batch_sampler=sampler,
                              collate_fn=collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True, drop_last=True, global_batch=self.batch_size)
        self._train_sampler = loader.batch_sampler
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            loader.batch_sampler.set_epoch(trainer.current_epoch)
        self._apply_resume()
        return loader

    # -- resuming mid-epoch ------------------------------------------------------------------
    # The loader may be built before a checkpoint is restored (``trainer.estimated_stepping_batches``
    # builds it early when ``max_epochs`` is set), so the steps taken in the checkpoint's epoch are
    # saved with the data module's state and handed to the step sampler whenever both exist.
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"steps_in_epoch": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_steps = int(state.get("steps_in_epoch", 0))
        self._apply_resume()

    def _apply_resume(self) -> None:
        sampler, steps = getattr(self, "_train_sampler", None), getattr(self, "_resume_steps", 0)
        if sampler is not None and steps:
            sampler.resume_at(steps if steps < len(sampler) else 0)  # the next pass skips the steps taken
            self._resume_steps = 0

    def _eval_loader(self, name: str) -> DataLoader:
        _, world = self._world()
        return self._loader(name, shuffle=False, drop_last=False, global_batch=self.micro_batch_size * world)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        name = "test" if "test" in self.datasets else "val"
        if name not in self.datasets:
            raise DataError("the test command needs data.test (or data.val / data.val_fraction)")
        return self._eval_loader(name)


def _strict_error(key: str, row_id: str, reason: str, detail: str = "") -> DataError:
    detail = f" ({detail})" if detail else ""
    return DataError(f"{key}: row {row_id} dropped: {reason}{detail} (data.strict is true)")


def _first_drop(report: DataReport) -> tuple[str, str, str]:
    """The row a strict run would have stopped at: rows are read in the same order with or without
    ``strict``, and ``report.examples`` gains its reasons in the order of their first drop."""
    reason = next(iter(report.examples))
    return report.examples[reason][0], reason, report.details.get(reason, "")


PROGRESS_MIN_ROWS = 2000  # sources shorter than this tokenise in seconds: no progress lines


def _progress(items: list, description: str):
    """Iterate with progress on long inputs, rank zero only: a live line on a terminal, plain lines every
    ``DFT_LIGHTNING_PROGRESS_EVERY_S`` seconds otherwise (``dft_lightning.progress``)."""
    if len(items) < PROGRESS_MIN_ROWS:
        return items
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from dft_lightning.progress import track

    return track(items, description, unit="rows", enabled=rank_zero_only.rank == 0)
