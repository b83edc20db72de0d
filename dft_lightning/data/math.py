"""``MathDataModule``: math reasoning data in the schemas the DFT paper trains on, as chat SFT records.

Three source formats (``source_format``), each a problem plus one supervised solution:

- ``numina``: NuminaMath-CoT (``AI-MO/NuminaMath-CoT``): ``problem`` and ``solution`` strings (the
  optional ``source`` is ignored); rows without them fall back to their ``messages`` (the last user
  and the last assistant turn). The paper samples 100,000 rows at random: ``num_samples`` + ``seed``.
- ``openr1``: OpenR1-Math reasoning traces, either LUFFY's filtered copy
  (``Elliott/Openr1-Math-46k-8192``: ``prompt`` and ``target`` are lists of chat turns; the problem is
  the last user turn, the trace the last assistant turn; the copy's own system turn is not kept, set
  ``system_prompt`` for one) or the raw ``open-r1/OpenR1-Math-220k`` (``problem``, ``generations``: a
  list of traces, ``correctness_math_verify`` and ``is_reasoning_complete``: lists of flags aligned
  with it). With a list of traces the first one flagged correct (and not flagged incomplete) is used;
  a row with none is dropped as ``incorrect`` (or ``incomplete`` when correct traces exist but none
  is complete). Traces over ``max_trace_tokens`` tokens of the training tokenizer are dropped as
  ``trace_too_long`` (LUFFY's 8,192 cap; its copy is already filtered, the raw set is not).
- ``rejection``: the offline-RL setting: JSONL (or any local/hub source) of ``question`` (or
  ``prompt`` / ``problem``) and a verified ``response``, with an optional ``verified`` / ``correct``
  flag; rows flagged false are dropped as ``unverified``.

``fields`` renames what a format reads (``problem``, ``response``, ``correct``, ``complete``); each
unset name falls back to the format's candidates above, the first present in a row winning. An empty
string switches a flag field off. Flags may be booleans, 0/1 or ``"true"``/``"false"``-like strings;
anything else drops the row as ``bad_flag``.

``prompt_style``: ``raw`` puts the problem in the user turn as is (what the paper's code trains on);
``boxed`` appends "Please reason step by step, and put your final answer within \\boxed{}.". The
Qwen2.5-Math ``qwen-boxed`` evaluation prompt has that sentence as the system turn instead: set
``system_prompt`` to it (with ``raw``) to train on that layout.

Every drop is counted by reason in the split's ``DataReport``: ``missing_field``, ``bad_type``,
``empty_prompt``, ``empty_response``, ``incorrect``, ``incomplete``, ``trace_too_long``,
``unverified``, ``bad_flag``, plus the base class's ``overlong`` and ``malformed_json``.

Not handled here: answer checking (flags are trusted as given), filtering by NuminaMath ``source``,
building the rejection-sampled data (that is generation, not loading), multi-turn math dialogues.
Sampling (``num_samples``) converts rows in a seeded random order until that many are kept: dropped
rows do not count, and fewer are kept only when the source runs out (which is warned about).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

from dft_lightning.data.chat import DropRow
from dft_lightning.data.module import ChatDataModule
from dft_lightning.errors import DataError

SourceFormat = Literal["numina", "openr1", "rejection"]
PromptStyle = Literal["raw", "boxed"]
BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
TRUE_WORDS = {"true", "yes", "1", "correct", "verified"}
FALSE_WORDS = {"false", "no", "0", "incorrect", "unverified"}


@dataclass
class MathFields:
    """Row fields a math source format reads; ``None`` uses the format's defaults, ``""`` none.

    Attributes:
        problem: the problem: a string or a list of chat turns (the last user turn is used).
        response: the solution / trace: a string, a list of chat turns (the last assistant turn),
            or (``openr1``) a list of candidate traces.
        correct: correctness flag: a boolean or (``openr1``) a list aligned with the traces.
        complete: ``openr1`` only: reasoning-complete flags aligned with the traces.
    """

    problem: str | None = None
    response: str | None = None
    correct: str | None = None
    complete: str | None = None


FORMAT_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "numina": {"problem": ("problem", "messages"), "response": ("solution", "messages"), "correct": (),
               "complete": ()},
    "openr1": {"problem": ("prompt", "problem"), "response": ("target", "generations"),
               "correct": ("correctness_math_verify",), "complete": ("is_reasoning_complete",)},
    "rejection": {"problem": ("question", "prompt", "problem"), "response": ("response",),
                  "correct": ("verified", "correct"), "complete": ()},
}
FLAG_DROP = {"numina": "incorrect", "openr1": "incorrect", "rejection": "unverified"}


class MathDataModule(ChatDataModule):
    """Math problems with solutions or reasoning traces (NuminaMath-CoT, OpenR1-Math, rejection-sampled).

    Args:
        train: training data: a hub dataset id (e.g. ``AI-MO/NuminaMath-CoT``) or local json/jsonl/parquet.
        source_format: ``numina``, ``openr1`` or ``rejection`` (see the module docstring).
        prompt_style: ``raw`` (the problem as is) or ``boxed`` (append the step-by-step / ``\\boxed{}``
            instruction).
        num_samples: sample this many training rows at random with ``seed`` (paper: 100,000 for
            NuminaMath-CoT); all rows when unset.
        fields: row field names, per role; unset ones use the format's defaults.
        max_trace_tokens: ``openr1`` only: drop traces longer than this many tokens (``trace_too_long``);
            ``None`` keeps all.
        val: validation data, same forms; optional.
        test: data for the ``test`` command (default: the validation data).
        tokenizer: tokenizer spec; linked from ``model.pretrained`` by the CLI.
        split: hub split of ``train``.
        val_split: hub split of ``val``.
        subset: hub configuration name (e.g. ``default`` / ``extended`` for OpenR1-Math-220k).
        val_fraction: when ``val`` is not given, hold out this fraction of training rows.
        system_prompt: system message prepended to every chat.
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
        self, train: str, source_format: SourceFormat = "numina", prompt_style: PromptStyle = "raw",
        num_samples: int | None = None, fields: MathFields | None = None, max_trace_tokens: int | None = 8192,
        val: str | None = None, test: str | None = None, tokenizer: str | None = None, split: str = "train",
        val_split: str = "test", subset: str | None = None, val_fraction: float = 0.0,
        system_prompt: str | None = None, max_length: int = 2048, overlong: Literal["drop", "truncate"] = "drop",
        batch_size: int = 256, micro_batch_size: int = 4, seed: int = 42, strict: bool = False,
        num_workers: int = 0, packing: bool = False, pack_length: int | None = None, cache: bool = True,
        chat_template: str | None = None,
    ) -> None:
        if source_format not in FORMAT_FIELDS:
            raise DataError(f"data.source_format must be one of {sorted(FORMAT_FIELDS)}, got {source_format!r}")
        if prompt_style not in ("raw", "boxed"):
            raise DataError(f"data.prompt_style must be 'raw' or 'boxed', got {prompt_style!r}")
        if num_samples is not None and num_samples < 1:
            raise DataError(f"data.num_samples must be positive, got {num_samples}")
        if max_trace_tokens is not None and max_trace_tokens < 1:
            raise DataError(f"data.max_trace_tokens must be positive or null, got {max_trace_tokens}")
        super().__init__(
            train=train, val=val, test=test, tokenizer=tokenizer, split=split, val_split=val_split, subset=subset,
            val_fraction=val_fraction, system_prompt=system_prompt, max_length=max_length, overlong=overlong,
            batch_size=batch_size, micro_batch_size=micro_batch_size, max_samples=num_samples, seed=seed,
            strict=strict, num_workers=num_workers, packing=packing, pack_length=pack_length, cache=cache,
            chat_template=chat_template,
        )
        self.source_format, self.prompt_style, self.max_trace_tokens = source_format, prompt_style, max_trace_tokens
        self.fields = fields or MathFields()  # named by the base class's "field missing everywhere" error
        self.candidates = {
            f.name: FORMAT_FIELDS[source_format][f.name] if getattr(self.fields, f.name) is None
            else tuple(filter(None, [getattr(self.fields, f.name)]))
            for f in dataclass_fields(MathFields)
        }

    # -- conversion -------------------------------------------------------------------------
    def row_to_messages(self, row: Any) -> list[dict[str, str]]:
        if not isinstance(row, dict):
            raise DropRow("not_an_object")
        problem = _turn_text(_pick(row, self.candidates["problem"]), "user", "problem")
        if not problem.strip():
            raise DropRow("empty_prompt")
        name, value = _pick(row, self.candidates["response"])
        if self.source_format == "openr1":
            response = self._openr1_trace(row, value)
        else:
            response = _turn_text((name, value), "assistant", "response")
            flag = _flag(_get(row, self.candidates["correct"]))
            if flag is False:
                raise DropRow(FLAG_DROP[self.source_format], f"field {self._first(row, 'correct')!r} is false")
        if not response.strip():
            raise DropRow("empty_response")
        user = f"{problem}\n{BOXED_SUFFIX}" if self.prompt_style == "boxed" else problem
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _openr1_trace(self, row: dict[str, Any], value: Any) -> str:
        """The trace of an OpenR1 row: the first correct, complete one of a list, or the single one."""
        correct = _get(row, self.candidates["correct"])
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            flags = _flag_list(correct, len(value))
            done = _flag_list(_get(row, self.candidates["complete"]), len(value))
            usable = [i for i in range(len(value)) if correct is None or flags[i]]
            if not usable:
                raise DropRow("incorrect", f"no trace flagged true in {self._first(row, 'correct')!r}")
            chosen = next((i for i in usable if done[i] is not False), None)
            if chosen is None:
                raise DropRow("incomplete", f"no correct trace is complete per {self._first(row, 'complete')!r}")
            trace = value[chosen]
        else:
            trace = _turn_text(("trace", value), "assistant", "response")
            if correct is not None and not any(_flag_list(correct, None)):
                raise DropRow("incorrect", f"field {self._first(row, 'correct')!r} is false")
        if self.max_trace_tokens is not None:
            n = len(self.tokenizer(trace, add_special_tokens=False)["input_ids"])
            if n > self.max_trace_tokens:
                raise DropRow("trace_too_long", f"over data.max_trace_tokens={self.max_trace_tokens}")
        return trace

    def _first(self, row: dict[str, Any], role: str) -> str:
        return next((n for n in self.candidates[role] if row.get(n) is not None), "/".join(self.candidates[role]))


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """``(name, value)`` of the first of ``names`` present (not None) in ``row``."""
    for name in names:
        if row.get(name) is not None:
            return name, row[name]
    raise DropRow("missing_field", " or ".join(f"field {n!r}" for n in names))


def _get(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if row.get(n) is not None), None)


def _turn_text(named: tuple[str, Any], role: str, what: str) -> str:
    """A string field as is, or the content of the last ``role`` turn of a list of chat turns."""
    name, value = named
    if isinstance(value, str):
        return value
    if isinstance(value, list) and not value:
        raise DropRow("empty_response" if role == "assistant" else "empty_prompt", f"{what} field {name!r} is empty")
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        turns = [m.get("content") for m in value if m.get("role") == role]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
        raise DropRow("bad_type", f"{what} field {name!r} has no {role} turn with string content")
    raise DropRow("bad_type", f"{what} field {name!r} must be a string or a list of chat turns")


def _flag(value: Any) -> bool | None:
    """A correctness-like flag as a boolean (``None`` when absent); raises ``DropRow('bad_flag')``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise DropRow("bad_flag", f"cannot read {value!r} as true/false")


def _flag_list(value: Any, n: int | None) -> list[bool | None]:
    """Per-trace flags (``None`` where unknown); a scalar flag applies to every trace."""
    if isinstance(value, list):
        flags = [_flag(v) for v in value]
        return flags if n is None else (flags + [None] * n)[:n]
    return [_flag(value)] * (1 if n is None else n)
