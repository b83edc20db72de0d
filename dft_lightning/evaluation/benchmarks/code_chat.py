"""Prompt styles of the code benchmarks (HumanEval, HumanEval+, MultiPL-E): raw completion or chat.

``prompt_style`` (an init argument of each code benchmark):

* ``completion``: the function stub as a raw string; the model continues it, and the engine stops at the
  benchmark's stop sequences (base models; the original HumanEval / MultiPL-E protocol).
* ``chat``: one user message holding an instruction and the stub in a fenced block, asking for the complete
  function in one fenced code block of that language (the way chat-model harnesses prompt), rendered with the
  model's chat template; no stop sequences (the turn ends at EOS). Before grading, ``code_for_grading`` takes the
  code out of the reply (``extract_code``) and fits it to the stub (see below).
* ``auto`` (default): ``chat`` when ``evaluate`` finds a chat model (``evaluation.model_kind``: the checkpoint's
  name says Instruct / Chat / ``-it`` and its tokenizer's chat template opens an assistant turn), else
  ``completion``. Without ``evaluate`` (no ``setup`` call) ``auto`` is ``completion``.

Which fenced block (``extract_code``): a reply may hold several. The last block that defines the function wins
(the function restated first and solved later, or a solution followed by a usage example that does not define
it); else the first block tagged with the language or untagged; else the first block. A fence left open (the
reply ran out of tokens) ends at the end of the reply; a reply without any fence is taken as code.

How the code meets the stub (``code_for_grading``); the grader then runs ``prompt + completion + tests`` as for
completions:

* Python: a block that defines the function (the signature repeated) is appended after the stub as a whole
  (imports and helpers included; a Python redefinition replaces the stub), with any ``if __name__ ==
  "__main__":`` block cut off; a block holding only the body is indented under the stub when it is not.
* Brace languages (C++, Java, JavaScript, PHP, Bash, Perl): the body after the repeated signature line, up to the
  brace that closes it, or the whole block when it is only the body; blank lines are dropped (MultiPL-E's Perl
  stop sequence is a blank line), then the benchmark's stop sequences cut it as they cut a completion.

Not handled: helpers a brace-language reply defines outside the function (left out), braces inside strings or
comments of such a body (they can end it early), replies in another language than asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from dft_lightning.evaluation.benchmarks.base import ModelInfo

__all__ = [
    "LANGUAGES",
    "PROMPT_STYLES",
    "PromptStyle",
    "chat_prompt",
    "code_blocks",
    "code_for_grading",
    "extract_code",
    "function_name",
    "resolve_style",
]

PromptStyle = Literal["chat", "completion", "auto"]
PROMPT_STYLES = ("chat", "completion", "auto")

#: language key -> (name in the instruction, fence tag, other tags a reply may use)
LANGUAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "py": ("Python", "python", ("py", "python3")),
    "js": ("JavaScript", "javascript", ("js", "node")),
    "cpp": ("C++", "cpp", ("c++", "cc", "cxx")),
    "java": ("Java", "java", ()),
    "php": ("PHP", "php", ()),
    "sh": ("Bash", "bash", ("sh", "shell")),
    "pl": ("Perl", "perl", ("pl",)),
}

_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL | re.MULTILINE)
_PY_DEF_RE = r"^[ \t]*(?:async[ \t]+)?def[ \t]+{name}[ \t]*\("
_MAIN_GUARD_RE = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
_SIGNATURE_RES = (
    re.compile(r"\bsub\s+(\w+)"),  # Perl
    re.compile(r"\bfunction\s+(\w+)"),  # JavaScript, PHP
    re.compile(r"(\w+)\s*\([^()]*\)\s*\{\s*$"),  # C++, Java, Bash: name(...) {
)


def resolve_style(style: str, model: ModelInfo | None) -> tuple[str, str]:
    """``(chat|completion, why)`` for a configured ``style``; ``auto`` follows ``model.chat``."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style != "auto":
        return style, "set in the config"
    if model is None:
        return "completion", "auto without a model to look at"
    return ("chat" if model.chat else "completion"), model.reason


def chat_prompt(stub: str, language: str = "py") -> list[dict[str, str]]:
    """One user message: the instruction and the stub in a fenced block of ``language``."""
    name, tag, _ = LANGUAGES.get(language, (language, language, ()))
    text = (
        f"Complete the following {name} function. Reply with the complete function, its signature included, "
        f"in a single ```{tag} code block.\n\n```{tag}\n{stub.strip()}\n```"
    )
    return [{"role": "user", "content": text}]


def code_blocks(reply: str) -> list[tuple[str, str]]:
    """``(tag, code)`` of every fenced block in order (an unclosed last fence runs to the end of the reply)."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(reply)]


def function_name(stub: str, language: str = "py", entry_point: str | None = None) -> str | None:
    """The name of the function the stub opens (``entry_point`` when given)."""
    if entry_point:
        return entry_point
    if language == "py":
        found = re.findall(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)", stub, re.MULTILINE)
        return found[-1] if found else None
    for line in reversed(stub.splitlines()):
        for pattern in _SIGNATURE_RES:
            match = pattern.search(line)
            if match:
                return match.group(1)
    return None


def _defines(code: str, name: str | None, language: str) -> bool:
    if name is None:
        return False
    if language == "py":
        return re.search(_PY_DEF_RE.format(name=re.escape(name)), code, re.MULTILINE) is not None
    return _signature_end(code.splitlines(), name) is not None


def extract_code(reply: str, name: str | None = None, language: str = "py") -> str:
    """The code of ``reply`` (see the module docstring for which block)."""
    blocks = code_blocks(reply)
    if not blocks:
        return reply.strip("\n")
    defining = [code for _, code in blocks if _defines(code, name, language)]
    if defining:
        return defining[-1]
    _, tag, other = LANGUAGES.get(language, (language, language, ()))
    tagged = [code for t, code in blocks if t in ("", tag, language, *other)]
    return (tagged or [blocks[0][1]])[0]


def _signature_end(lines: list[str], name: str) -> int | None:
    """Index of the line that opens the function's body (its ``{``) in a brace language, or None."""
    word = re.compile(rf"(?<![\w$]){re.escape(name)}(?!\w)")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not word.search(line) or stripped.startswith(("//", "#", "*", "/*")):
            continue
        if stripped.endswith("{"):
            return i
        following = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        if following is not None and lines[following].strip() == "{" and ("(" in line or stripped.startswith("sub ")):
            return following  # the brace on a line of its own
    return None


def _body_after_signature(lines: list[str], start: int) -> list[str]:
    """The lines after ``lines[start]`` (which opens the body) through the line whose brace closes it."""
    depth = lines[start].count("{") - lines[start].count("}")
    body = []
    for line in lines[start + 1 :]:
        body.append(line)
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            break
    return body


def code_for_grading(problem: Mapping[str, Any], reply: str, language: str = "py") -> str:
    """The completion to grade for a chat ``reply`` to ``problem`` (the stub is ``problem["prompt"]``)."""
    stub = problem["prompt"]
    name = function_name(stub, language, problem.get("entry_point"))
    code = extract_code(reply, name, language)
    if language == "py":
        if _defines(code, name, language):
            guard = _MAIN_GUARD_RE.search(code)
            if guard:
                code = code[: guard.start()]
            return "\n" + code.strip("\n") + "\n"
        lines = code.strip("\n").splitlines()
        first = next((line for line in lines if line.strip()), "")
        if first and not first[:1].isspace():
            lines = [f"    {line}" if line.strip() else line for line in lines]
        return "\n".join(lines) + "\n"
    lines = code.splitlines()
    start = _signature_end(lines, name) if name else None
    if start is not None:
        lines = _body_after_signature(lines, start)
    return "\n".join(line for line in lines if line.strip()) + "\n"
