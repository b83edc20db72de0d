"""``CodeDataModule``: UltraFeedback prompts with their best-rated completion, as chat SFT records.

UltraFeedback (``openbmb/UltraFeedback``) rows hold an ``instruction`` and ``completions``: a list of
dicts, each with a ``response`` and ``annotations`` mapping aspect names (``helpfulness``,
``honesty``, ``instruction_following``, ``truthfulness``) to a dict whose ``Rating`` is a string such
as ``"4"`` or ``"N/A"``. Per prompt the completion with the highest mean rating over its aspects is
kept (``best_completion``):

- ratings that do not read as numbers (``"N/A"``, empty, missing) are left out of the mean;
- a completion without any numeric rating, or with an empty response, is skipped;
- ties go to the completion that comes first in the list;
- ``aspects`` restricts the mean to the named aspects (default: every aspect present).

A row whose completions are all skipped is dropped as ``no_rated_completion`` (or ``empty_response``
when rated completions exist but all are empty); an empty or non-list ``completions`` field is
``no_completions``; a blank instruction is ``empty_prompt``; a wrong type is ``bad_type``; a missing
field is ``missing_field`` (and a config error when it is missing from every row). The paper samples
10,000 prompts: ``num_samples`` + ``seed``.

Not handled here: filtering prompts by UltraFeedback ``source`` or topic (e.g. code-only prompts),
the ``overall_score`` / ``fine-grained_score`` fields, preference pairs. Sampling converts prompts
in a seeded random order until ``num_samples`` are kept: dropped rows do not count, and fewer are
kept only when the source runs out (which is warned about).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from dft_lightning.data.chat import DropRow
from dft_lightning.data.module import ChatDataModule
from dft_lightning.errors import DataError


@dataclass
class FeedbackFields:
    """Field names of an UltraFeedback-style row.

    Attributes:
        instruction: the prompt (a string).
        completions: the list of completions.
        response: a completion's response text.
        annotations: a completion's per-aspect annotations.
        rating: the rating inside one aspect's annotation.
    """

    instruction: str = "instruction"
    completions: str = "completions"
    response: str = "response"
    annotations: str = "annotations"
    rating: str = "Rating"


def rating_value(value: Any) -> float | None:
    """A rating as a finite float, or ``None`` (``"N/A"``, empty, not a number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def mean_rating(annotations: Any, aspects: list[str] | None = None, rating_key: str = "Rating") -> float | None:
    """Mean numeric rating over the aspects of one completion, or ``None`` when it has none.

    An aspect's annotation is a dict holding ``rating_key`` (a list of such dicts counts each), or a
    bare number/string.
    """
    if not isinstance(annotations, dict):
        return None
    values: list[float] = []
    for aspect, annotation in annotations.items():
        if aspects is not None and aspect not in aspects:
            continue
        for item in annotation if isinstance(annotation, list) else [annotation]:
            raw = item.get(rating_key) if isinstance(item, dict) else item
            number = rating_value(raw)
            if number is not None:
                values.append(number)
    return sum(values) / len(values) if values else None


def best_completion(
    completions: list[Any], fields: FeedbackFields | None = None, aspects: list[str] | None = None
) -> tuple[int, float]:
    """Index and mean rating of the best-rated completion with a non-empty response.

    Raises ``DropRow('no_rated_completion')`` when no completion has a numeric rating, and
    ``DropRow('empty_response')`` when the rated ones all have empty responses. Ties: first wins.
    """
    fields = fields or FeedbackFields()
    best: tuple[int, float] | None = None
    rated = 0
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict):
            continue
        score = mean_rating(completion.get(fields.annotations), aspects, fields.rating)
        if score is None:
            continue
        rated += 1
        response = completion.get(fields.response)
        if not isinstance(response, str) or not response.strip():
            continue
        if best is None or score > best[1]:
            best = (i, score)
    if best is None:
        if rated:
            raise DropRow("empty_response", "every rated completion has an empty response")
        raise DropRow("no_rated_completion", f"no completion has a numeric {fields.rating!r}")
    return best


class CodeDataModule(ChatDataModule):
    """UltraFeedback-style data: each prompt with its best-rated completion.

    Args:
        train: training data: a hub dataset id (e.g. ``openbmb/UltraFeedback``) or local json/jsonl/parquet.
        num_samples: sample this many prompts at random with ``seed`` (paper: 10,000); all when unset.
        aspects: aspects averaged into a completion's rating (default: every aspect it has).
        fields: row field names (``instruction``, ``completions``, ``response``, ``annotations``, ``rating``).
        val: validation data, same forms; optional.
        test: data for the ``test`` command (default: the validation data).
        tokenizer: tokenizer spec; linked from ``model.pretrained`` by the CLI.
        split: hub split of ``train``.
        val_split: hub split of ``val``.
        subset: hub configuration name.
        val_fraction: when ``val`` is not given, hold out this fraction of training rows.
        system_prompt: system message prepended to every chat.
        prompt_template: format string for the user turn built from the instruction (``{prompt}``).
        max_length: maximum tokens per row, prompt and response together.
        overlong: ``drop`` rows over ``max_length`` or ``truncate`` them (both counted).
        batch_size: rows per optimizer step, across all devices (paper: 256).
        micro_batch_size: rows per forward/backward pass on one device.
        seed: sampling and shuffling seed.
        strict: raise on the first dropped row instead of counting it.
        num_workers: data loader worker processes.
        packing: pack several records into each row (attention stays within a record).
        pack_length: tokens per packed row (default ``max_length``).
        cache: keep the tokenised rows on disk and read them back on the next run with the same source,
            tokenizer and settings (``dft_lightning.data.cache``).
        chat_template: as ``ChatDataModule``'s (``plain`` for a base model's tokenizer without one).
    """

    def __init__(
        self, train: str, num_samples: int | None = None, aspects: list[str] | None = None,
        fields: FeedbackFields | None = None, val: str | None = None, test: str | None = None,
        tokenizer: str | None = None, split: str = "train", val_split: str = "test", subset: str | None = None,
        val_fraction: float = 0.0, system_prompt: str | None = None, prompt_template: str = "{prompt}",
        max_length: int = 2048, overlong: Literal["drop", "truncate"] = "drop", batch_size: int = 256,
        micro_batch_size: int = 4, seed: int = 42, strict: bool = False, num_workers: int = 0,
        packing: bool = False, pack_length: int | None = None, cache: bool = True,
        chat_template: str | None = None,
    ) -> None:
        if num_samples is not None and num_samples < 1:
            raise DataError(f"data.num_samples must be positive, got {num_samples}")
        if aspects is not None and not aspects:
            raise DataError("data.aspects must name at least one aspect (or be null for all)")
        super().__init__(
            train=train, val=val, test=test, tokenizer=tokenizer, split=split, val_split=val_split, subset=subset,
            val_fraction=val_fraction, system_prompt=system_prompt, prompt_template=prompt_template,
            max_length=max_length, overlong=overlong, batch_size=batch_size, micro_batch_size=micro_batch_size,
            max_samples=num_samples, seed=seed, strict=strict, num_workers=num_workers, packing=packing,
            pack_length=pack_length, cache=cache,
            chat_template=chat_template,
        )
        self.fields = fields or FeedbackFields()
        self.aspects = list(aspects) if aspects is not None else None

    def row_to_messages(self, row: Any) -> list[dict[str, str]]:
        if not isinstance(row, dict):
            raise DropRow("not_an_object")
        f = self.fields
        for name in (f.instruction, f.completions):
            if row.get(name) is None:
                raise DropRow("missing_field", f"field {name!r}")
        instruction, completions = row[f.instruction], row[f.completions]
        if not isinstance(instruction, str):
            raise DropRow("bad_type", f"field {f.instruction!r} must be a string")
        if not instruction.strip():
            raise DropRow("empty_prompt")
        if not isinstance(completions, list) or not completions:
            raise DropRow("no_completions", f"field {f.completions!r} must be a non-empty list")
        index, _ = best_completion(completions, f, self.aspects)
        messages = [
            {"role": "user", "content": self.prompt_template.format(prompt=instruction)},
            {"role": "assistant", "content": completions[index][f.response]},
        ]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages
