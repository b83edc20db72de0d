"""Multimodal math benchmarks: MathVerse, MathVision and WeMath loaded into uniform problems, scored by rule.

A problem is a dict ``{"id", "question", "options", "answer", "question_type", "letters", "images", "meta"}``:
``question_type`` is ``"multiple_choice"`` (``answer`` is then a letter, ``letters`` the valid ones) or
``"free_form"``; ``images`` is a list of references (a ``PIL.Image``, raw ``bytes``, or an absolute path;
``load_image`` opens any of them); ``meta`` keeps the source fields worth grouping by.

Source schemas as published on the hub (field names are the defaults of ``SCHEMAS`` and can be overridden with
``fields={"question": "query_cot"}``; these are assumptions from the datasets' cards and viewers, not checked
against every release):

* **MathVerse** (``AI4Math/MathVerse``, config and split ``testmini``; 3,940 rows = 788 problems x 5
  versions): ``sample_index``, ``problem_index``, ``problem_version`` (Text Dominant ... Vision Only),
  ``question`` (multiple-choice rows carry their choices *inside* the text, "Choices:\\nA:...\\nB:..."),
  ``image``, ``answer`` (a letter for multi-choice), ``question_type`` (``multi-choice`` / ``free-form``),
  ``metadata``, ``query_wo``, ``query_cot`` (the official prompts).
* **MathVision** (``MathLLMs/MathVision``, splits ``test`` 3,040 and ``testmini`` 304): ``id``,
  ``question``, ``options`` (a list of option texts, empty for free-form), ``image`` (a relative path) and
  ``decoded_image`` (the picture), ``answer`` (a letter when there are options), ``solution``, ``level``,
  ``subject``.
* **WeMath** (``We-Math/We-Math``, split ``testmini``, 1,740 problems, all multiple-choice): ``ID``,
  ``question``, ``option`` (one string, "A. ...; B. ...; ..."), ``answer`` (a letter), ``image_path`` (the
  picture), ``key``, ``knowledge concept``, ``question number``.

A problem is multiple-choice when its ``question_type`` field says so, or it has options; its letters come from
the options, or from option lines in the question ("A:", "(B)", "C."), else A-E. A multiple-choice reference
that is not a letter is mapped to the option with the same text, or the problem is graded free-form (logged).
Sources: a hub id (``datasets``, imported only then), a local ``.jsonl``/``.json``/``.parquet`` file, or a
directory of such files (those whose name starts with the split, if any), read by ``dft_lightning.rows``. Image
paths are resolved against ``image_root`` (default: the file's directory) and must exist (``check_images=False``
skips that).

Scoring is by rule (``graders.choice.ChoiceGrader``): the option letter extracted from the completion against the
reference letter, free-form answers through the math grader. The papers' numbers usually come from a judge
model (GPT-4o) extracting and comparing answers; ``docs/benchmarks.md`` says why the two can differ. Not
computed: WeMath's four-dimensional metrics (IK/IG/CM/RM), MathVerse's per-step CoT scores, or any judge.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dft_lightning.errors import MissingFileError, UserError
from dft_lightning.evaluation.benchmarks.base import GradedBenchmark
from dft_lightning.evaluation.graders.choice import ChoiceGrader, normalize_choice, option_letters
from dft_lightning.evaluation.graders.math import normalize_answer
from dft_lightning.rows import looks_local, read_rows, row_files

__all__ = [
    "MULTIMODAL_BENCHMARKS",
    "SCHEMAS",
    "MultimodalBenchmark",
    "MultimodalSchema",
    "load_image",
    "load_multimodal_benchmark",
    "parse_option_string",
    "prompt_text",
]

logger = logging.getLogger(__name__)

ImageRef = Any  # PIL.Image.Image | bytes | str (absolute path)


@dataclass(frozen=True)
class MultimodalSchema:
    """Where a benchmark keeps each field; each entry lists candidate column names, first present wins."""

    hub_id: str
    split: str
    subset: str | None = None
    id: tuple[str, ...] = ("id",)
    question: tuple[str, ...] = ("question",)
    answer: tuple[str, ...] = ("answer",)
    options: tuple[str, ...] = ("options",)
    images: tuple[str, ...] = ("image",)
    question_type: tuple[str, ...] = ()
    meta: tuple[str, ...] = ()


SCHEMAS: dict[str, MultimodalSchema] = {
    "mathverse": MultimodalSchema(
        "AI4Math/MathVerse",
        split="testmini",
        subset="testmini",
        id=("sample_index", "id"),
        options=(),
        images=("image",),
        question_type=("question_type",),
        meta=("problem_index", "problem_version", "metadata", "query_cot", "query_wo"),
    ),
    "mathvision": MultimodalSchema(
        "MathLLMs/MathVision",
        split="test",
        id=("id",),
        images=("decoded_image", "image"),
        meta=("level", "subject"),
    ),
    "wemath": MultimodalSchema(
        "We-Math/We-Math",
        split="testmini",
        id=("ID", "id"),
        options=("option", "options"),
        images=("image_path", "image"),
        meta=("key", "knowledge concept", "question number", "split"),
    ),
}
MULTIMODAL_BENCHMARKS = tuple(SCHEMAS)
GROUP_KEYS = {
    "mathverse": ("question_type", "problem_version"),
    "mathvision": ("question_type", "subject", "level"),
    "wemath": ("question_type",),
}
_MC_VALUES = {"multi-choice", "multiple-choice", "multiple_choice", "multichoice", "choice", "mc"}

# ------------------------------------------------------------------------------------------------- fields


def _first(row: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, str | list | tuple) and len(value) == 0):
            return value
    return None


_OPTION_ITEM_RE = re.compile(r"(?:^|;)\s*(?:\(([A-Z])\)|([A-Z])\s*[.．:：)])\s*")


def parse_option_string(text: str) -> list[str]:
    """``"A. 3; B. 4; C. five"`` -> ``["3", "4", "five"]``; ``[]`` unless the letters run A, B, C, ... in order."""
    matches = list(_OPTION_ITEM_RE.finditer(text))
    if len(matches) < 2 or [m.group(1) or m.group(2) for m in matches] != list(option_letters(len(matches))):
        return []
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return [text[m.end() : end].strip().rstrip(";").strip() for m, end in zip(matches, ends, strict=True)]


_QUESTION_OPTION_RE = re.compile(r"(?m)^\s*\(?([A-Z])\s*[\).:：]")


def _letters_in_question(question: str) -> str | None:
    found = [m.group(1) for m in _QUESTION_OPTION_RE.finditer(question)]
    for start in range(len(found)):  # the first run A, B, C, ... of at least two option lines
        if found[start] == "A":
            run = 1
            while start + run < len(found) and found[start + run] == option_letters(run + 1)[-1]:
                run += 1
            if run >= 2:
                return option_letters(run)
    return None


def _options(value: Any) -> tuple[list[str], str]:
    """(option texts, raw option text for the prompt when it could not be split)."""
    if value is None:
        return [], ""
    if isinstance(value, str):
        parsed = parse_option_string(value)
        return (parsed, "") if parsed else ([], value.strip())
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value], ""
    raise ValueError(f"options must be a list or a string, got {type(value).__name__}")


def _images(value: Any, root: Path | None, check: bool, where: str) -> list[ImageRef]:
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    refs: list[ImageRef] = []
    for item in items:
        if isinstance(item, Mapping):  # datasets' Image feature as stored in parquet: {"bytes": ..., "path": ...}
            if item.get("bytes"):
                refs.append(bytes(item["bytes"]))
                continue
            item = item.get("path")
        if isinstance(item, bytes | bytearray):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            path = Path(item).expanduser()
            if not path.is_absolute() and root is not None:
                path = root / path
            if check and not path.is_file():
                raise ValueError(f"{where}: image {item!r} not found (looked at {path})")
            refs.append(str(path))
        elif hasattr(item, "size") and hasattr(item, "mode"):  # a PIL image, as datasets decodes it
            refs.append(item)
        elif item is not None:
            raise ValueError(f"{where}: unsupported image value of type {type(item).__name__}")
    return refs


def load_image(ref: ImageRef):
    """Open an image reference (PIL image, bytes or path) as a ``PIL.Image.Image``."""
    from PIL import Image  # lazily: only callers that need pixels pay for it

    if isinstance(ref, bytes | bytearray):
        return Image.open(io.BytesIO(ref))
    if isinstance(ref, str | Path):
        return Image.open(ref)
    return ref


# ------------------------------------------------------------------------------------------------ loading


def _read_local(path: Path, split: str, key: str) -> list[dict]:
    """Rows of a file, or of a directory's files whose name starts with ``split`` (all of them when none does)."""
    files = row_files(path, key)
    if path.is_dir():
        files = [p for p in files if re.match(rf"^{re.escape(split)}(?:[-_.]|$)", p.name)] or files
    return [row for file in files for _, row in read_rows(file, key=key)]


def _to_problem(
    benchmark: str, schema: MultimodalSchema, row: Mapping[str, Any], index: int, root: Path | None, check: bool
) -> dict[str, Any]:
    where = f"{benchmark}: row {index}"
    question, answer = _first(row, schema.question), _first(row, schema.answer)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no question in field(s) {list(schema.question)}")
    if answer is None or str(answer).strip() == "":
        raise ValueError(f"{where}: no answer in field(s) {list(schema.answer)}")
    answer = str(answer).strip()
    options, options_text = _options(_first(row, schema.options))
    declared = _first(row, schema.question_type)
    if declared is not None:
        multiple_choice = str(declared).strip().lower() in _MC_VALUES
    else:
        multiple_choice = bool(options or options_text)
    letters = ""
    if multiple_choice:
        letters = option_letters(len(options)) if options else _letters_in_question(f"{question}\n{options_text}")
        letters = letters or "ABCDE"
        letter = normalize_choice(answer, letters)
        if letter is None and options:
            matches = [
                ltr for ltr, o in zip(letters, options, strict=False) if normalize_answer(o) == normalize_answer(answer)
            ]
            letter = matches[0] if len(matches) == 1 else None
        if letter is None:
            logger.warning(
                "%s: multiple-choice answer %r is not a letter of %s; graded free-form", where, answer, letters
            )
            multiple_choice, letters = False, ""
        else:
            answer = letter
    row_id = _first(row, schema.id)
    return {
        "id": f"{benchmark}/{row_id if row_id is not None else index}",
        "question": question.strip(),
        "options": options,
        "options_text": options_text,
        "answer": answer,
        "question_type": "multiple_choice" if multiple_choice else "free_form",
        "letters": letters,
        "images": _images(_first(row, schema.images), root, check, where),
        "meta": {name: row[name] for name in schema.meta if name in row},
    }


def _schema(benchmark: str, fields: Mapping[str, str | Sequence[str]] | None) -> MultimodalSchema:
    key = benchmark.lower().replace("-", "").replace("_", "")
    if key not in SCHEMAS:
        raise KeyError(f"unknown multimodal benchmark {benchmark!r}; known: {sorted(SCHEMAS)}")
    schema = SCHEMAS[key]
    for name, value in (fields or {}).items():
        if name not in {"id", "question", "answer", "options", "images", "question_type", "meta"}:
            raise KeyError(f"unknown field {name!r} for {benchmark}")
        names = (value,) if isinstance(value, str) else tuple(value)
        schema = MultimodalSchema(**{**schema.__dict__, name: names})
    return schema


def load_multimodal_benchmark(
    benchmark: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    fields: Mapping[str, str | Sequence[str]] | None = None,
    image_root: str | Path | None = None,
    check_images: bool = True,
) -> list[dict[str, Any]]:
    """Problems of ``benchmark`` (``mathverse``, ``mathvision``, ``wemath``) from ``source`` (default: the hub id
    of ``SCHEMAS``); ``split``/``subset`` default to the schema's. ``fields`` overrides column names."""
    schema = _schema(benchmark, fields)
    name = benchmark.lower().replace("-", "").replace("_", "")
    split = split or schema.split
    source = source or schema.hub_id
    path = Path(source).expanduser()
    if looks_local(source):
        if not path.exists():
            raise MissingFileError(f"benchmark file not found: {path}")
        rows = _read_local(path, split, name)
        root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    else:
        rows = [row for _, row in read_rows(str(source), key=name, split=split, name=subset or schema.subset)]
        root = Path(image_root) if image_root is not None else None
    if limit is not None:
        rows = rows[:limit]
    problems = [_to_problem(name, schema, row, i, root, check_images) for i, row in enumerate(rows)]
    if not problems:
        raise ValueError(f"{source}: no {benchmark} problems")
    return problems


# ----------------------------------------------------------------------------------------------- benchmark

MC_INSTRUCTION = (
    "Please reason step by step, and put the letter of the correct option within \\boxed{} (for example \\boxed{A})."
)
FREE_FORM_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def prompt_text(problem: Mapping[str, Any], mc: str = MC_INSTRUCTION, free_form: str = FREE_FORM_INSTRUCTION) -> str:
    """The text part of a prompt: the question, the options when the question does not hold them, the instruction."""
    parts = [problem["question"]]
    if problem.get("options"):
        parts.append(
            "Options:\n"
            + "\n".join(f"{ltr}. {o}" for ltr, o in zip(problem["letters"], problem["options"], strict=False))
        )
    elif problem.get("options_text"):
        parts.append("Options: " + problem["options_text"])
    parts.append(mc if problem["question_type"] == "multiple_choice" else free_form)
    return "\n".join(parts)


class MultimodalBenchmark(GradedBenchmark):
    """A multimodal benchmark: image + text chats, scored by rule.

    Args:
        benchmark: ``mathverse``, ``mathvision`` or ``wemath`` (the schema, see the module docstring).
        source: a local file or directory, or a hub id (default: the benchmark's hub dataset).
        split: the split (default: the benchmark's, e.g. MathVision ``test``).
        subset: hub configuration name (default: the benchmark's).
        limit: the first ``limit`` problems only.
        fields: column names overriding the schema's (``{"question": "query_cot"}``).
        image_root: where relative image paths resolve (default: the file's folder).
        check_images: check that image files exist when reading.
        grader: a ``ChoiceGrader`` of your own.
        mc_instruction / free_form_instruction: the instruction after multiple-choice / free-form questions.
        group_keys: problem (or ``meta``) fields to break scores down by (default: the benchmark's usual ones).
        name: the label in metric names (default: ``benchmark``).
        problems: ready problems instead of reading ``source``.
    """

    def __init__(
        self, benchmark: str, source: str | Path | None = None, *, split: str | None = None,
        subset: str | None = None, limit: int | None = None, fields: Mapping[str, str | Sequence[str]] | None = None,
        image_root: str | Path | None = None, check_images: bool = True, grader: ChoiceGrader | None = None,
        mc_instruction: str = MC_INSTRUCTION, free_form_instruction: str = FREE_FORM_INSTRUCTION,
        group_keys: Sequence[str] = (), name: str | None = None, problems: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        key = benchmark.lower().replace("-", "").replace("_", "")
        if key not in SCHEMAS and problems is None:
            raise UserError(f"benchmark {name or benchmark!r}: unknown multimodal benchmark {benchmark!r}; known: "
                            f"{', '.join(SCHEMAS)}")
        self.benchmark, self.name = benchmark, name or benchmark
        self.source, self.split, self.subset, self.limit = source, split, subset, limit
        self.fields, self.image_root, self.check_images = fields, image_root, check_images
        self.grader = grader or ChoiceGrader()
        self.mc_instruction, self.free_form_instruction = mc_instruction, free_form_instruction
        # how each benchmark is usually broken down (``evaluate`` reports these)
        self.group_keys = tuple(group_keys) or GROUP_KEYS.get(key, ("question_type",))
        if problems is not None:
            self.problems = problems

    @classmethod
    def load(cls, benchmark: str, source: str | Path | None = None, **kwargs: Any) -> MultimodalBenchmark:
        """The benchmark with its problems read now (``kwargs``: the other constructor arguments)."""
        bench = cls(benchmark, source, **kwargs)
        bench.problems  # noqa: B018 - read now, so a bad source fails here
        return bench

    def load_problems(self) -> list[dict[str, Any]]:
        return load_multimodal_benchmark(self.benchmark, self.source, split=self.split, subset=self.subset,
                                         limit=self.limit, fields=self.fields, image_root=self.image_root,
                                         check_images=self.check_images)

    def prompt(self, problem: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One user turn in the chat format of HF vision-language processors (Qwen2.5-VL):
        ``{"type": "image", "image": ref}`` entries, then ``{"type": "text", "text": ...}``."""
        text = prompt_text(problem, self.mc_instruction, self.free_form_instruction)
        content = [*({"type": "image", "image": ref} for ref in problem["images"]), {"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def texts(self) -> list[str]:
        return [prompt_text(p, self.mc_instruction, self.free_form_instruction) for p in self.problems]

    def images(self) -> list[list[ImageRef]]:
        return [list(p["images"]) for p in self.problems]

    def messages(self) -> list[list[dict[str, Any]]]:
        """Every problem's prompt (see ``prompt``)."""
        return self.prompts()

    def breakdown(
        self, results: Sequence[Sequence[bool]], key: str | Callable[[Mapping[str, Any]], Any] = "question_type"
    ) -> dict[str, dict[str, float]]:
        """Mean accuracy and problem count per group; ``key`` names a problem or ``meta`` field
        (``"problem_version"`` for MathVerse) or is a function of the problem."""
        groups: dict[str, list[float]] = {}
        for problem, row in zip(self.problems, results, strict=True):
            value = key(problem) if callable(key) else problem.get(key, problem["meta"].get(key))
            groups.setdefault(str(value), []).append(sum(map(bool, row)) / len(row) if row else 0.0)
        return {g: {"problems": len(v), "accuracy": sum(v) / len(v)} for g, v in groups.items()}
