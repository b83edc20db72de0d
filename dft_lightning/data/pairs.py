"""``PairDataModule``: preference pairs (one prompt, a chosen and a rejected response) for pairwise objectives.

Each source row becomes two chat records, the same user turn with the chosen and with the rejected
response, tokenised by the shared chat-SFT path (``ChatDataModule``: chat template, assistant-only
supervision plus EOS, over-long policy, drop report, tokenised-row cache). The user turn is built as
``MathDataModule`` builds it: ``prompt_template`` around the prompt, then with ``prompt_style: boxed`` the
step-by-step / ``\\boxed{}`` sentence on a new line, then ``system_prompt`` first when set; so the chosen
record of a pair from ``tools/build_offline_rl.py --pairs`` is token for token the training row
``MathDataModule`` (``source_format: rejection``) makes of the same response.

**Batching.** ``batch_size`` and ``micro_batch_size`` count **pairs** (the paper's DPO batch of 128 is 128
pairs, 256 records). A step's pairs are grouped by length and split into micro-batches of at most
``micro_batch_size`` pairs: a pair's chosen and rejected record are always in the same micro-batch (rows
``2k`` and ``2k + 1``), and ``MicroBatch.pairs`` names their sequence ids, so the objective can match them.
Ranks get whole pairs (the step sampler deals pairs, not records); the collation is per rank.
Evaluation steps are filled up with masked pairs (no supervised token, in no pair), as elsewhere.

Rows: ``prompt`` (a string, or chat turns: the last user turn), ``chosen`` and ``rejected`` (strings, or
chat turns: the last assistant turn), renamed with ``fields``. Dropped and counted by reason:
``missing_field``, ``bad_type``, ``empty_prompt``, ``empty_response`` (chosen or rejected),
``identical_pair`` (the same response twice, also after truncation), ``overlong`` (either record over
``max_length`` with ``overlong: drop``), ``malformed_json``. The report counts pairs (rows); its token
percentiles cover both records of each pair.

``datasets[split]`` holds the records flat (pair ``k``: records ``2k``, ``2k + 1``), each with
``input_ids``, ``labels`` and ``row_id`` (``<row id>:chosen`` / ``<row id>:rejected``), so the cache and
precomputed reference log-probs (``model.reference: precomputed:<file>``) work on them unchanged.

Not handled here: packing (``packing: true`` is refused: packed rows would split pairs across
micro-batches), several rejected responses per prompt (one row per pair), sharing the prompt's forward
between the two records.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from dft_lightning.batch import IGNORE_INDEX, MicroBatch
from dft_lightning.data.batching import StepBatchSampler, pad_rows
from dft_lightning.data.chat import ChatEncoder, DataReport, DropRow
from dft_lightning.data.math import BOXED_SUFFIX, PromptStyle, _turn_text
from dft_lightning.data.module import ChatDataModule
from dft_lightning.data.workers import guarded_loader
from dft_lightning.errors import DataError

ROLES = ("chosen", "rejected")


@dataclass
class PairFields:
    """Which row fields hold the prompt and the two responses (the builder's pair rows by default)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class PairDataModule(ChatDataModule):
    """Chosen/rejected pairs from local json/jsonl/parquet files (e.g. ``OUT/pairs`` of the offline-RL builder)
    or a hub dataset.

    Args:
        train: training pairs: a file, a directory of files, or a hub dataset id.
        fields: row fields of the prompt, the chosen and the rejected response.
        prompt_style: ``raw`` (the prompt as is) or ``boxed`` (append the step-by-step / ``\\boxed{}``
            sentence, as ``MathDataModule`` does; the builder's responses were sampled with it).
        val: validation pairs, same forms; optional.
        test: data for the ``test`` command (default: the validation data).
        tokenizer: tokenizer spec; linked from ``model.pretrained`` by the CLI.
        split: hub split of ``train``.
        val_split: hub split of ``val``.
        subset: hub configuration name.
        val_fraction: when ``val`` is not given, hold out this fraction of training pairs.
        system_prompt: system message prepended to every chat.
        prompt_template: format string for the user turn (``{prompt}``), applied before ``prompt_style``.
        max_length: maximum tokens per record (prompt and one response).
        overlong: ``drop`` pairs with a record over ``max_length`` or ``truncate`` the record (both counted).
        batch_size: pairs per optimizer step, across all devices (the DFT paper's DPO: 128).
        micro_batch_size: pairs per forward/backward pass on one device (2x as many records).
        max_samples: keep this many training pairs, drawn at random (with ``seed``) among the usable ones.
        seed: sampling and shuffling seed.
        strict: raise on the first dropped pair instead of counting it.
        num_workers: data loader worker processes.
        packing: must stay ``false`` (refused: see the module docstring).
        pack_length: unused (packing is refused).
        cache: keep the tokenised records on disk and read them back (``dft_lightning.data.cache``).
        chat_template: as ``ChatDataModule``'s.
    """

    def __init__(
        self, train: str, fields: PairFields | None = None, prompt_style: PromptStyle = "raw",
        val: str | None = None, test: str | None = None, tokenizer: str | None = None, split: str = "train",
        val_split: str = "test", subset: str | None = None, val_fraction: float = 0.0,
        system_prompt: str | None = None, prompt_template: str = "{prompt}", max_length: int = 2048,
        overlong: Literal["drop", "truncate"] = "drop", batch_size: int = 128, micro_batch_size: int = 2,
        max_samples: int | None = None, seed: int = 42, strict: bool = False, num_workers: int = 0,
        packing: bool = False, pack_length: int | None = None, cache: bool = True, chat_template: str | None = None,
    ) -> None:
        if packing:
            raise DataError("data.packing is not supported by PairDataModule: packed rows would split a pair's "
                            "chosen and rejected records across micro-batches; set data.packing=false")
        if prompt_style not in ("raw", "boxed"):
            raise DataError(f"data.prompt_style must be 'raw' or 'boxed', got {prompt_style!r}")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"data.max_samples must be positive, got {max_samples}")
        super().__init__(
            train=train, val=val, test=test, tokenizer=tokenizer, split=split, val_split=val_split, subset=subset,
            val_fraction=val_fraction, system_prompt=system_prompt, prompt_template=prompt_template,
            max_length=max_length, overlong=overlong, batch_size=batch_size, micro_batch_size=micro_batch_size,
            max_samples=max_samples, seed=seed, strict=strict, num_workers=num_workers, cache=cache,
            chat_template=chat_template,
        )
        self.fields = fields or PairFields()  # named by the base class's "field missing everywhere" error
        self.prompt_style = prompt_style

    # -- conversion -------------------------------------------------------------------------
    def pair_messages(self, row: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Raw row -> (chosen chat, rejected chat); raises ``DropRow``."""
        if not isinstance(row, dict):
            raise DropRow("not_an_object")
        f = self.fields
        for name in (f.prompt, f.chosen, f.rejected):
            if row.get(name) is None:
                raise DropRow("missing_field", f"field {name!r}")
        problem = _turn_text((f.prompt, row[f.prompt]), "user", "prompt")
        if not problem.strip():
            raise DropRow("empty_prompt")
        responses = [_turn_text((name, row[name]), "assistant", role) for role, name in zip(
            ROLES, (f.chosen, f.rejected), strict=True)]
        for role, response in zip(ROLES, responses, strict=True):
            if not response.strip():
                raise DropRow("empty_response", f"empty {role} response")
        if responses[0] == responses[1]:
            raise DropRow("identical_pair", "chosen and rejected are the same text")
        user = self.prompt_template.format(prompt=problem)
        if self.prompt_style == "boxed":
            user = f"{user}\n{BOXED_SUFFIX}"
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        chats = tuple([*head, {"role": "user", "content": user}, {"role": "assistant", "content": r}]
                      for r in responses)
        return chats[0], chats[1]

    def row_to_messages(self, row: Any) -> list[dict[str, str]]:
        """The chosen chat (what an SFT run on the same rows would train on)."""
        return self.pair_messages(row)[0]

    def encode_row(self, encoder: ChatEncoder, row: Any) -> tuple[dict[str, Any], bool]:
        chosen, rejected = self.pair_messages(row)
        c_ids, c_labels, c_cut = encoder.encode(chosen)
        r_ids, r_labels, r_cut = encoder.encode(rejected)
        if c_ids == r_ids:
            raise DropRow("identical_pair", "chosen and rejected are the same tokens after truncation")
        return {"input_ids": c_ids, "labels": c_labels, "rejected_input_ids": r_ids,
                "rejected_labels": r_labels}, c_cut or r_cut

    def tokenise(self, source: str, key: str, split: str, *, sample: int | None = None
                 ) -> tuple[list[dict], DataReport]:
        """The pairs of one source as flat records (pair ``k``: records ``2k`` and ``2k + 1``)."""
        pairs, report = super().tokenise(source, key, split, sample=sample)
        records: list[dict[str, Any]] = []
        for pair in pairs:
            ids, labels = pair["rejected_input_ids"], pair["rejected_labels"]
            report.prompt_lengths.append(next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels)))
            report.response_lengths.append(sum(t != IGNORE_INDEX for t in labels[1:]))
            records.append({"input_ids": pair["input_ids"], "labels": pair["labels"],
                            "row_id": f"{pair['row_id']}:chosen"})
            records.append({"input_ids": ids, "labels": labels, "row_id": f"{pair['row_id']}:rejected"})
        return records, report

    def build(self, source: str, key: str, split: str, *, sample: int | None = None) -> tuple[list[dict], DataReport]:
        records, report = super().build(source, key, split, sample=sample)
        _check_pairs(records, key)
        return records, report

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.tokenizer = self.load_tokenizer()
        records, report = self.build(self.train, "data.train", self.split, sample=self.max_samples)
        if self.val is not None:
            self.datasets["val"], self.reports["val"] = self.build(self.val, "data.val", self.val_split)
        elif self.val_fraction > 0:  # whole pairs are held out
            n = len(records) // 2
            order = list(range(n))
            random.Random(self.seed + 1).shuffle(order)
            held = set(order[: max(1, int(n * self.val_fraction))])
            self.datasets["val"] = [r for i, r in enumerate(records) if i // 2 in held]
            records = [r for i, r in enumerate(records) if i // 2 not in held]
        if self.test is not None:
            self.datasets["test"], self.reports["test"] = self.build(self.test, "data.test", self.val_split)
        self.datasets["train"], self.reports["train"] = records, report
        for rep in self.reports.values():
            rank_zero_info(rep.summary().replace("rows read", "pairs read", 1))
        if len(records) // 2 < self.batch_size and stage in (None, "fit"):
            raise DataError(f"data.batch_size={self.batch_size} pairs but only {len(records) // 2} training pairs "
                            "are usable; lower data.batch_size or add data")

    def _loader(self, name: str, *, shuffle: bool, drop_last: bool, global_batch: int) -> DataLoader:
        rank, world = self._world()
        records = self.datasets[name]
        sampler = StepBatchSampler(len(records) // 2, global_batch, rank=rank, world_size=world, shuffle=shuffle,
                                   seed=self.seed, drop_last=drop_last)
        # a dead worker is one error naming the pairs (by their chosen records' ids) it was building
        return guarded_loader(PairDataset(records), records[0::2], batch_sampler=sampler,
                              collate_fn=PairStepCollator(self.micro_batch_size, self.tokenizer.pad_token_id),
                              num_workers=self.num_workers)


def _check_pairs(records: list[dict[str, Any]], key: str) -> None:
    """Records alternate chosen / rejected of one row (a cache entry of other rows would break that)."""
    ok = len(records) % 2 == 0 and all(
        str(c["row_id"]).endswith(":chosen") and r["row_id"] == f"{str(c['row_id'])[:-len(':chosen')]}:rejected"
        for c, r in zip(records[0::2], records[1::2], strict=True))
    if not ok:
        raise DataError(f"{key}: tokenised records are not chosen/rejected pairs (a stale cache entry? "
                        "set data.cache=false or remove $DFT_LIGHTNING_CACHE/tokenised)")


class PairDataset(torch.utils.data.Dataset):
    """Pairs over flat records; a negative index ``-(k + 1)`` returns pair ``k`` with every label masked."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records) // 2

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        k = index if index >= 0 else -index - 1
        chosen, rejected = self.records[2 * k], self.records[2 * k + 1]
        if index >= 0:
            return chosen, rejected
        return tuple({**r, "labels": [IGNORE_INDEX] * len(r["labels"]), "row_id": None}  # type: ignore[return-value]
                     for r in (chosen, rejected))


class PairStepCollator:
    """One step's pairs -> micro-batches of at most ``micro_batch_size`` pairs, grouped by length.

    Pair ``j`` of a micro-batch is rows ``2j`` (chosen) and ``2j + 1`` (rejected); ``MicroBatch.pairs``
    lists the real (not masked filler) pairs.
    """

    def __init__(self, micro_batch_size: int, pad_id: int) -> None:
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id

    def __call__(self, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[MicroBatch]:
        ordered = sorted(pairs, key=lambda p: max(len(p[0]["input_ids"]), len(p[1]["input_ids"])), reverse=True)
        size = self.micro_batch_size
        out = []
        for start in range(0, len(ordered), size):
            group = ordered[start : start + size]
            real = [j for j, (chosen, _) in enumerate(group) if chosen.get("row_id") is not None]
            out.append(dataclasses.replace(
                pad_rows([r for pair in group for r in pair], self.pad_id),
                pairs=torch.tensor([[2 * j, 2 * j + 1] for j in real], dtype=torch.long).reshape(-1, 2)))
        return out
