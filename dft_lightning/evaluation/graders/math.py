"""Math answer grading: extract a model's final answer and decide whether it equals a reference.

What it does:

* ``extract_answer`` takes the last ``\\boxed{...}`` (also ``\\fbox``/``\\framebox`` and the brace-less
  ``\\boxed 5``) with balanced braces; without a box it falls back to "the answer is X" /
  "final answer is X" / "Answer: X", then to the last number in the text; ``None`` when nothing is found.
* ``is_equivalent`` first normalises both strings cheaply (spaces, ``\\left``/``\\right``, thin spaces,
  degrees, trailing ``\\text{}`` units, dollar signs, ``dfrac``, thousands separators, ...) and compares
  them as strings and, when both are plain numbers, numerically (relative tolerance 1e-6, so
  ``27.0 == 27`` and ``0.5 == \\frac12``). Otherwise it asks ``math_verify`` (sympy) with its signal-based
  timeouts switched off, because those only work in a process's main thread.
* ``grade_math_batch`` / ``MathGrader.grade_batch`` run grading in worker *processes* with a per-item
  wall-clock limit: a worker that overruns is killed and replaced, the item counts as incorrect and is
  counted in ``GradingStats.timeouts``. This module never imports torch.

What it does not handle: answers that need the question to be judged (multiple-choice letter vs the
option's value, "Devon" vs "\\text{Devon's}"), unit conversion (``100 cm`` vs ``1 m``), or answers a model
states without a box somewhere other than at the end. ``grade_math`` (in-process) has no time limit; use
the batch API for untrusted volumes of model output.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing as mp
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from math_verify import parse, verify

__all__ = [
    "GradingStats",
    "MathGrader",
    "extract_answer",
    "extract_boxed",
    "grade_math",
    "grade_math_batch",
    "is_equivalent",
    "normalize_answer",
]


class _DropNoTimeoutWarning(logging.Filter):
    """math_verify warns once that its timeouts are off; here the process pool enforces them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropNoTimeoutWarning())

# --------------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")
_ANSWER_IS_RE = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_TRAILING_CLAUSE_RE = re.compile(r",?\s+(?:because|since|which|as|so|for|where|when|if)\b")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _balanced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == '{'``; None when it never closes."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # a control sequence: \{ and \} are literal braces, \\ is a line break
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}``/``\\fbox{}``/``\\boxed X`` in ``text``, else None.

    A box whose braces never close (a truncated generation) is skipped in favour of an earlier one.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced(text, pos)
            if content is not None:
                return content.strip()
        elif pos > match.end():  # "\boxed 5": the token after the space
            token = re.match(r"[^\s$]+", text[pos:])
            if token:
                return token.group(0).rstrip(".,;")
    return None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].replace("\\$", "").strip()  # "\$" is a currency sign, not math mode
    if rest.startswith("$"):  # "$...$" or "$$...$$": take the math span
        inner = re.match(r"\$+([^$]+)\$+", rest)
        if inner:
            return inner.group(1).strip()
    line = rest.split("\n", 1)[0]
    line = re.split(r"\.\s|\.$", line, maxsplit=1)[0]  # stop at the end of the sentence
    line = _TRAILING_CLAUSE_RE.split(line, maxsplit=1)[0]  # "12, which is even" -> "12"
    line = line.strip().strip("$").strip()
    return line or None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last box, then "the answer is X", then the last number."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    stated = _after_answer_is(text)
    if stated is not None:
        return stated
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


# ------------------------------------------------------------------------------------------ normalisation

_UNIT_WRAP = r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*"
_TRAILING_UNIT_RE = re.compile(r"(?<=[\d}).])\s*(?:" + _UNIT_WRAP + r"\{[^{}]*\}(?:\^\{?\d\}?)?\s*)+$")
_WRAP_RE = re.compile(_UNIT_WRAP + r"\{([^{}]*)\}")
_SPACES_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\s+")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_RE = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(\d)")
_SUBSCRIPT_RE = re.compile(r"_\{(\w+)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LHS_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?=(?!=)")
_CHOICE_RE = re.compile(r"^\(?([A-E])\)?$")


def normalize_answer(answer: str) -> str:
    """A canonical string for cheap comparison; sympy is never called here."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = _TRAILING_UNIT_RE.sub("", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _WRAP_RE.sub(r"\1", s)
    s = _SPACES_RE.sub("", s)
    s = s.replace("{,}", ",")
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_RE.sub(r"\\frac\1{\2}", s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = _SUBSCRIPT_RE.sub(r"_\1", s)  # "52_{8}" -> "52_8"
    s = s.rstrip(".")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    choice = _CHOICE_RE.match(s)
    if choice:
        s = choice.group(1)
    return s


_SCI_RE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:\\times|\\cdot|\*)10\^\{?(-?\d+)\}?$")
_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}$")
_SLASH_RE = re.compile(r"^(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)$")


def _as_number(s: str) -> float | None:
    """``s`` (already normalised) as a float when it is a plain number, fraction or scientific form."""
    if "_" not in s:  # float() reads "1011_2" (a base-2 answer) as 10112
        try:
            return float(s)  # also "4.5e33", "025"
        except ValueError:
            pass
    if m := _SCI_RE.match(s):
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    if (m := _FRAC_RE.match(s)) and float(m.group(3)) != 0:
        value = float(m.group(2)) / float(m.group(3))
        return -value if m.group(1) else value
    if (m := _SLASH_RE.match(s)) and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    return None


@functools.lru_cache(maxsize=8192)
def _parse_cached(expr: str) -> tuple:
    """math_verify's parse of one bare answer, memoised per process (references repeat k times)."""
    return tuple(parse(f"${expr}$", parsing_timeout=None))


def _strip_lhs(s: str) -> str:
    """``x=5`` -> ``5`` when the left side is a single (possibly subscripted) variable."""
    return s.split("=", 1)[1] if s.count("=") == 1 and _LHS_RE.match(s) else s


def is_equivalent(prediction: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference answer."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    if ("=" in pred) != ("=" in ref):  # "x=5" against "5": compare the right-hand side
        pred, ref = _strip_lhs(pred), _strip_lhs(ref)
        if pred == ref:
            return True
    pred_num, ref_num = _as_number(pred), _as_number(ref)
    if pred_num is not None and ref_num is not None:
        return math.isclose(pred_num, ref_num, rel_tol=1e-6, abs_tol=1e-9)
    gold, target = _parse_cached(reference.strip().strip("$")), _parse_cached(prediction.strip().strip("$"))
    if not gold or not target:
        return False
    try:
        return bool(verify(list(gold), list(target), timeout_seconds=None))
    except Exception:  # math_verify/sympy errors on exotic input mean "not shown equal"
        return False


def grade_math(completion: str, reference: str) -> bool:
    """Whether ``completion``'s final answer equals ``reference`` (in-process, no time limit)."""
    answer = extract_answer(completion)
    return answer is not None and is_equivalent(answer, reference)


# ------------------------------------------------------------------------------------------- process pool


@dataclass
class GradingStats:
    """What happened in one batch: items graded, items cut off by the time limit, worker failures."""

    items: int = 0
    timeouts: int = 0
    errors: int = 0
    seconds: float = 0.0


def _worker_main(conn: Connection, fn: Callable[[str, str], bool], memory_limit_mb: int | None) -> None:
    """Worker loop: warm up sympy's lazy imports, say ready, then grade ``(index, a, b)`` until None."""
    if memory_limit_mb is not None:
        import resource  # POSIX only; a MemoryError then fails the item instead of swapping the machine

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        _parse_cached("1")
    except Exception:  # warm-up only; a real failure shows on the first item
        pass
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, completion, reference = message
        try:
            conn.send((index, bool(fn(completion, reference)), False))
        except Exception:
            conn.send((index, False, True))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, fn: Callable[[str, str], bool], memory_limit_mb: int | None):
        self.ctx, self.fn, self.memory_limit_mb = ctx, fn, memory_limit_mb
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, fn, memory_limit_mb), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.born = time.monotonic()
        self.item: int | None = None
        self.deadline = math.inf

    def stop(self, force: bool) -> None:
        if not force:
            try:
                self.conn.send(None)
            except OSError:
                force = True
        if force:
            self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def grade_math_batch(
    pairs: Iterable[tuple[str, str]],
    workers: int = 2,
    timeout_s: float = 5.0,
    grade_fn: Callable[[str, str], bool] = grade_math,
    start_method: str = "spawn",
    startup_timeout_s: float = 120.0,
    memory_limit_mb: int | None = None,
) -> tuple[list[bool], GradingStats]:
    """Grade ``(completion, reference)`` pairs in ``workers`` processes, each item limited to ``timeout_s``.

    ``grade_fn`` must be picklable (a module-level function). A worker that overruns the limit is killed
    and replaced; its item is False and counted in ``stats.timeouts``. A worker that dies or raises marks
    its item False and counts in ``stats.errors``. ``workers=0`` grades in this process without limits.
    ``start_method`` defaults to "spawn" so a parent holding CUDA or threads is never forked.
    ``memory_limit_mb`` caps each worker's address space (POSIX), so a sympy blow-up fails its item.
    """
    items = list(pairs)
    stats = GradingStats(items=len(items))
    begin = time.monotonic()
    results = [False] * len(items)
    if workers <= 0 or not items:
        for i, (completion, reference) in enumerate(items):
            try:
                results[i] = bool(grade_fn(completion, reference))
            except Exception:
                stats.errors += 1
        stats.seconds = time.monotonic() - begin
        return results, stats

    ctx = mp.get_context(start_method)
    pending = deque(range(len(items)))
    pool = [_Worker(ctx, grade_fn, memory_limit_mb) for _ in range(min(workers, len(items)))]
    done = 0
    try:
        while done < len(items):
            for worker in list(pool):
                if worker.ready and worker.item is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((index, *items[index]))
                    except OSError:  # died while idle: the item goes back in the queue
                        pending.appendleft(index)
                        _replace(pool, worker)
                        continue
                    worker.item, worker.deadline = index, time.monotonic() + timeout_s
            now = time.monotonic()
            next_deadline = min(w.deadline if w.ready else w.born + startup_timeout_s for w in pool)
            for conn in wait([w.conn for w in pool], timeout=min(max(0.0, next_deadline - now), 60.0)):
                worker = next(w for w in pool if w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the worker died: its item (if any) failed
                    if not worker.ready:
                        raise RuntimeError("a grading worker died while starting") from None
                    if worker.item is not None:
                        stats.errors += 1
                        done += 1
                    worker.item = None
                    _replace(pool, worker)
                    continue
                if message == "ready":
                    worker.ready = True
                    continue
                index, ok, failed = message
                results[index] = ok
                stats.errors += int(failed)
                done += 1
                worker.item, worker.deadline = None, math.inf
            now = time.monotonic()
            for worker in list(pool):
                if not worker.ready and now > worker.born + startup_timeout_s:
                    raise RuntimeError(f"a grading worker did not start within {startup_timeout_s} s")
                if worker.item is not None and now > worker.deadline:
                    stats.timeouts += 1
                    done += 1
                    worker.item = None
                    _replace(pool, worker)
    finally:
        for worker in pool:
            worker.stop(force=worker.item is not None or not worker.ready)
    stats.seconds = time.monotonic() - begin
    return results, stats


def _replace(pool: list[_Worker], worker: _Worker) -> None:
    """Kill ``worker`` and put a fresh one in its place."""
    worker.stop(force=True)
    pool[pool.index(worker)] = _Worker(worker.ctx, worker.fn, worker.memory_limit_mb)


class MathGrader:
    """The math benchmark grader: ``grade(problem, completion)`` with the reference in ``problem["answer"]``."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        answer_key: str = "answer",
        memory_limit_mb: int | None = None,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.answer_key = answer_key
        self.memory_limit_mb = memory_limit_mb

    def reference(self, problem: Mapping[str, object]) -> str:
        if self.answer_key not in problem:
            raise KeyError(f"problem {problem.get('id', '?')!r} has no {self.answer_key!r} field")
        return str(problem[self.answer_key])

    def grade(self, problem: Mapping[str, object], completion: str) -> bool:
        """One completion, in this process (no time limit)."""
        return grade_math(completion, self.reference(problem))

    def grade_batch(
        self, problems: Sequence[Mapping[str, object]], completions: Sequence[str]
    ) -> tuple[list[bool], GradingStats]:
        """``completions[i]`` against ``problems[i]``, in the process pool with the per-item time limit."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        pairs = [(c, self.reference(p)) for p, c in zip(problems, completions, strict=True)]
        return grade_math_batch(
            pairs, workers=self.workers, timeout_s=self.timeout_s, memory_limit_mb=self.memory_limit_mb
        )
