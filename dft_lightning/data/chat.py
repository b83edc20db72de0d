"""Chat records -> supervised token sequences, with an honest report of what was dropped.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}``. ``to_messages`` builds one from a
raw row (a messages field, or prompt + response fields); ``ChatEncoder`` renders it with the
tokenizer's chat template and supervises exactly the assistant turns: the characters each
assistant turn adds to the rendered text (through its end-of-turn marker, without trailing
whitespace), found by rendering the conversation prefix by prefix. The text is tokenised once, with
offsets, and a token is supervised when its characters lie inside an assistant span. When the
template's turn terminator is not the tokenizer's EOS, EOS is appended after the last assistant turn
and supervised, so the model learns to stop.

Every dropped row is counted by reason in a ``DataReport`` with the first few row ids; nothing is
dropped silently.

Not handled here: images (multimodal records), templates whose rendering of a prefix is not a prefix
of the rendering of the whole conversation (e.g. ones that rewrite earlier turns): those raise.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dft_lightning.batch import IGNORE_INDEX
from dft_lightning.errors import DataError

ROLES = {"system", "user", "assistant"}
PLAIN_TEMPLATE = (  # data.chat_template: plain, for tokenizers without a chat template (base models)
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant:\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
)


def chat_template(tokenizer: Any, choice: str | None, *, what: str = "the tokenizer") -> str | None:
    """The Jinja template to render chats with: ``None`` for the tokenizer's own (``choice`` unset), the plain
    ``User:``/``Assistant:`` template for ``plain``, a ``.jinja`` file's text, or ``choice`` itself. A tokenizer
    without a template of its own and no ``choice`` is a ``DataError``: there is no right guess for a base model's
    turns, and a wrong one trains the model on turns it will never see."""
    if choice is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{what} has no chat template: set data.chat_template to 'plain' (User: / Assistant: "
                            "turns, for base models), a Jinja template or a .jinja file")
        return None
    if choice == "plain":
        return PLAIN_TEMPLATE
    if choice.endswith(".jinja"):
        from pathlib import Path

        path = Path(choice).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template={choice}: no such file")
        return path.read_text()
    return choice


class DropRow(Exception):
    """Raised while converting one row: it is dropped for ``reason`` (and counted)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DataReport:
    """What happened to the rows of one split; printed once and logged."""

    split: str
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)
    max_examples: int = 5
    sampled: int | None = None  # data.max_samples, when it drew from a larger source
    source_rows: int | None = None

    def drop(self, row_id: str, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.max_examples:
            ids.append(row_id)
        if detail and reason not in self.details:
            self.details[reason] = detail

    @property
    def supervised_tokens(self) -> int:
        return sum(self.response_lengths)

    @staticmethod
    def quantiles(values: list[int]) -> dict[str, int]:
        """p50 / p90 / p99 / max of ``values`` (empty dict when there are none)."""
        if not values:
            return {}
        ordered = sorted(values)
        picks = {f"p{round(q * 100)}": ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)}
        return {**picks, "max": ordered[-1]}

    def percentiles(self, values: list[int]) -> str:
        return " / ".join(f"{k} {v}" for k, v in self.quantiles(values).items()) or "-"

    def summary(self) -> str:
        lines = [
            f"[{self.split}] rows read {self.read}, kept {self.kept}, truncated {self.truncated}, "
            f"dropped {sum(self.dropped.values())}"
            + (f" (max_samples {self.sampled} of {self.source_rows} source rows)" if self.sampled is not None else "")
        ]
        for reason, count in sorted(self.dropped.items()):
            detail = f" ({self.details[reason]})" if reason in self.details else ""
            lines.append(f"  dropped {reason}: {count}, e.g. rows {', '.join(self.examples[reason])}{detail}")
        lines.append(f"  prompt tokens {self.percentiles(self.prompt_lengths)}")
        lines.append(f"  response tokens {self.percentiles(self.response_lengths)}")
        lines.append(f"  supervised tokens per epoch {self.supervised_tokens}")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        out = {f"data/{self.split}/rows_read": self.read, f"data/{self.split}/rows_kept": self.kept,
               f"data/{self.split}/rows_truncated": self.truncated,
               f"data/{self.split}/supervised_tokens": self.supervised_tokens}
        out.update({f"data/{self.split}/dropped_{k}": v for k, v in self.dropped.items()})
        for name, values in (("prompt", self.prompt_lengths), ("response", self.response_lengths)):
            out.update({f"data/{self.split}/{name}_tokens_{k}": v for k, v in self.quantiles(values).items()})
        return {k: float(v) for k, v in out.items()}


@dataclass
class FieldMap:
    """Which fields of a raw row hold the conversation.

    A row with a non-empty ``messages`` field is used as is; otherwise ``prompt`` and ``response``
    become one user and one assistant turn.
    """

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"


def to_messages(
    row: Any, fields: FieldMap, *, system_prompt: str | None = None, prompt_template: str = "{prompt}"
) -> list[dict[str, str]]:
    """Build the chat of one raw row, or raise ``DropRow`` naming why it cannot be used."""
    if not isinstance(row, dict):
        raise DropRow("not_an_object")
    messages = row.get(fields.messages)
    if messages:
        if not isinstance(messages, list):
            raise DropRow("bad_messages", f"field {fields.messages!r} is not a list")
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DropRow("bad_messages", "each message needs a string 'content'")
            if m.get("role") not in ROLES:
                raise DropRow("bad_role", f"role {m.get('role')!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise DropRow("empty_response", "no non-empty assistant message")
    else:
        for name in (fields.prompt, fields.response):
            if row.get(name) is None:
                raise DropRow("missing_field", f"field {name!r}")
        prompt, response = row[fields.prompt], row[fields.response]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DropRow("bad_type", "prompt and response must be strings")
        if not response.strip():
            raise DropRow("empty_response")
        out = [{"role": "user", "content": prompt_template.format(prompt=prompt)},
               {"role": "assistant", "content": response}]
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


class ChatEncoder:
    """Renders chats with a tokenizer's template and marks the supervised (assistant) tokens."""

    def __init__(self, tokenizer: Any, max_length: int, overlong: str = "drop", template: str | None = None) -> None:
        if overlong not in ("drop", "truncate"):
            raise DataError(f"data.overlong must be 'drop' or 'truncate', got {overlong!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"a fast tokenizer (with offsets) is required, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overlong = overlong
        self.template = template if template is not None else chat_template(tokenizer, None)  # None: its own

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template
        )

    def _empty_prefix(self) -> str:
        """What the template renders before a first assistant turn (e.g. a default system prompt)."""
        try:
            return self.render([], generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates that reject an empty conversation
            return ""

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character span of every assistant turn."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True) if i else self._empty_prefix()
            upto = self.render(messages[: i + 1])
            if i == 0 and not (upto.startswith(before) and text.startswith(upto)):
                raise DropRow("assistant_first", "the chat starts with an assistant turn this template rewrites")
            if not upto.startswith(before) or not text.startswith(upto):
                raise DataError(
                    "the chat template is not prefix-stable (rendering a conversation prefix does not give a "
                    "prefix of the whole); supervision spans cannot be found for this tokenizer"
                )
            end = len(upto.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return text, spans

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], bool]:
        """``(input_ids, labels, truncated)``; labels are ``-100`` outside assistant spans.

        Raises ``DropRow`` for over-long rows (``overlong: drop``) or rows left without any
        supervised token after truncation.
        """
        text, spans = self.assistant_spans(messages)
        if not spans:
            raise DropRow("empty_response")
        text = text[: spans[-1][1]]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for j, (s, e) in enumerate(offsets):
            while k < len(spans) and spans[k][1] <= s:
                k += 1
            if k < len(spans) and e > s and s >= spans[k][0] and e <= spans[k][1]:
                labels[j] = ids[j]
        eos = self.tokenizer.eos_token
        if eos and eos not in text[spans[-1][0] : spans[-1][1]]:
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        truncated = False
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                raise DropRow("overlong", f"longer than data.max_length={self.max_length}")
            ids, labels, truncated = ids[: self.max_length], labels[: self.max_length], True
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise DropRow("overlong" if truncated else "empty_response", "no supervised token left")
        return ids, labels, truncated
