"""Math answer grading: extract a model's final answer and decide whether it equals a reference.

What it does:

* ``extract_answer`` takes the last ``\\boxed{...}`` (also ``\\fbox``/``\\framebox`` and the brace-less
  ``\\boxed 5``) with balanced braces; without a box it falls back to "the answer is X" /
  "final answer is X" / "Answer: X", then to the last number in the text; ``None`` when nothing is found.
* ``is_equivalent`` first rewrites code-style answers as LaTeX (``1./4`` -> ``1/4``, ``np.sqrt(2)/2`` ->
  ``\\sqrt{2}/2``, ``math.pi``, ``x**2``; text rewriting only, nothing is evaluated), normalises both
  strings cheaply (spaces, ``\\left``/``\\right``, thin spaces, degrees, trailing ``\\text{}`` units,
  dollar signs, ``dfrac``, thousands separators, ...) and compares them as strings. When both are plain
  numbers (integers, decimals, ``1.5e-3``, ``1.5\\times10^{-3}``, ``10^{8}``, ``a/b``, ``\\frac{a}{b}``),
  the numeric rule decides, in exact rational arithmetic, and its answer is final. Otherwise it asks
  ``math_verify`` (sympy) with its signal-based timeouts switched off, because those only work in a
  process's main thread.
* The numeric rule, ``numeric_rule="exact"`` (default): equal values are equal (``27.0 == 27``,
  ``0.5 == \\frac12``, ``1.5e-3 == 0.0015``), and apart from that

  - integers and fractions are exact: ``1234568`` is not ``1234567``, and an integer or fraction answer
    must equal a decimal gold exactly (``\\frac13`` is not ``0.33``);
  - a decimal answer to a decimal gold is right when it rounds to the gold at the gold's written places
    (less than half a unit of its last digit away) and is within a relative 1e-4 of it: a longer answer
    that agrees (``3.14159265358`` for ``3.14159265``) is right; a wrong last digit (``3.14159266``) and
    extra digits on a short gold (``0.54`` for ``0.5``, ``2.998\\times10^{8}`` for ``3e8``) are wrong;
  - a decimal answer to a gold fraction that no decimal writes exactly (``\\frac13``) needs at least six
    significant digits and to be within one unit of its own last digit (``0.333333`` yes, ``0.3333`` no).

  ``numeric_rule="qwen"`` is the numeric rule of the Qwen2.5-Math evaluation harness, which produced the
  DFT paper's numbers: a relative tolerance of 1e-4 for every number, integers included, against the gold
  and its percent variants gold/100 and gold*100 (``0.5`` and ``5000`` for ``50``; ``1234568`` for
  ``1234567``; but not ``2.998\\times10^{8}`` for ``3e8``). Use it to compare with published numbers; only
  the comparison of two plain numbers differs, everything else is shared (a number against a symbolic
  form, ``3.1416`` against ``\\pi``, is math_verify's call under both rules).
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
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from typing import Literal

from math_verify import parse, verify

from dft_lightning.progress import advance

__all__ = [
    "NUMERIC_RULES",
    "GradingStats",
    "MathGrader",
    "NumericRule",
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


# ------------------------------------------------------------------------------------------- code-style golds

_CODE_PREFIX_RE = re.compile(r"\b(?:np|numpy|math|cmath|sympy|sp|scipy)\.(?=[A-Za-z_])")
_CODE_HINT_RE = re.compile(r"\b(?:np|numpy|math|cmath|sympy|sp|scipy)\.[A-Za-z_]|\*\*|\d\.(?![\d.])")
_CODE_CALL_RE = re.compile(r"\b([A-Za-z_]\w*)\(")
_CODE_OPERAND_RE = re.compile(r"[+-]?(?:\\[A-Za-z]+(?:\{[^{}]*\})?|[\w.]+)")
_CODE_FUNCS = {  # function -> (LaTeX opening, closing); anything else stays as written
    "sqrt": ("\\sqrt{", "}"),
    "exp": ("e^{", "}"),
    "log": ("\\ln(", ")"),
    "ln": ("\\ln(", ")"),
    "log10": ("\\log_{10}(", ")"),
    "log2": ("\\log_{2}(", ")"),
    "abs": ("|", "|"),
    "fabs": ("|", "|"),
    **{name: (f"\\{name}(", ")") for name in ("sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh")},
    **{f"a{name}": (f"\\arc{name}(", ")") for name in ("sin", "cos", "tan")},
}
_CODE_NAMES_RE = re.compile(r"\b(pi|inf)\b")
_CODE_MAX_CHARS = 300  # an answer, not a program: longer text is left alone


def _closing_paren(text: str, start: int) -> int | None:
    """Index of the ``)`` closing the ``(`` at ``text[start]``; None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _code_to_latex(text: str) -> str:
    """A Python-style expression (``1./4``, ``np.sqrt(2)/2``, ``math.pi/2``, ``x**2``) rewritten as LaTeX.

    Only text: nothing is evaluated. Strings with a backslash or a brace (LaTeX already) or without a hint
    of code (a module prefix, ``**``, a number ending in ``.``) come back unchanged.
    """
    if "\\" in text or "{" in text or len(text) > _CODE_MAX_CHARS or not _CODE_HINT_RE.search(text):
        return text
    return _translate_code(_CODE_PREFIX_RE.sub("", text))


def _translate_code(text: str) -> str:
    out, pos = [], 0
    while (call := _CODE_CALL_RE.search(text, pos)) is not None:
        close = _closing_paren(text, call.end() - 1)
        if close is None:
            break
        name, inner = call.group(1), _translate_code(text[call.end() : close])
        opening, closing = _CODE_FUNCS.get(name, (f"{name}(", ")"))
        out += [text[pos : call.start()], opening, inner, closing]
        pos = close + 1
    text = "".join(out) + text[pos:]
    text = re.sub(r"(\d)\.(?![\d.])", r"\1", text)  # "1./4" -> "1/4"
    text = _CODE_NAMES_RE.sub(lambda m: "\\pi" if m.group(1) == "pi" else "\\infty", text)
    while (power := text.find("**")) >= 0:  # "x**(1/2)" -> "x^{1/2}", "2**-3" -> "2^{-3}"
        rest = power + 2
        if text.startswith("(", rest) and (close := _closing_paren(text, rest)) is not None:
            text = f"{text[:power]}^{{{text[rest + 1 : close]}}}{text[close + 1 :]}"
        elif operand := _CODE_OPERAND_RE.match(text, rest):
            text = f"{text[:power]}^{{{operand.group(0)}}}{text[operand.end() :]}"
        else:
            text = text[:power] + "^" + text[rest:]
    return text


# -------------------------------------------------------------------------------------------------- numbers

NUMERIC_RULES = ("exact", "qwen")
NumericRule = Literal["exact", "qwen"]

_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_PLAIN_RE = re.compile(r"^([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$")
_SCI_RE = re.compile(r"^(?:(" + _NUM + r")(?:\\times|\\cdot|\*)|([+-]?))10\^(?:\{([+-]?\d+)\}|(\d))$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{(" + _NUM + r")\}\{(" + _NUM + r")\}$")
_SLASH_RE = re.compile(r"^(" + _NUM + r")/(" + _NUM + r")$")
_MAX_EXPONENT = 1000  # larger powers of ten (and longer digit strings) go to sympy, not into a rational
_MAX_DIGITS = 1000
_QWEN_REL_TOL = Fraction(1, 10_000)
_DECIMAL_RTOL = Fraction(1, 10_000)  # a longer decimal answer may differ from a short decimal gold by this much
_MIN_DIGITS_FOR_EXACT = 6  # significant digits a decimal needs to stand for a non-terminating fraction


@dataclass(frozen=True)
class _Number:
    """A number as written: its exact value, and for decimals the precision the writing claims.

    ``places`` is the number of decimal places (``3.14`` -> 2, ``1.5e-3`` -> 4, ``3e8`` -> -8) and
    ``digits`` the significant digits written; both None for exact forms (integers and fractions).
    """

    value: Fraction
    places: int | None = None
    digits: int | None = None


def _decimal(sign: str, whole: str, fraction: str | None, exponent: int = 0) -> _Number | None:
    """``[sign]whole[.fraction]e<exponent>`` as a number; None for no digits or absurd sizes."""
    written = whole + (fraction or "")
    if not written or len(written) > _MAX_DIGITS or abs(exponent) > _MAX_EXPONENT:
        return None
    value = Fraction(int(written), 10 ** len(fraction or "")) * Fraction(10) ** exponent
    value = -value if sign == "-" else value
    if fraction is None and exponent == 0:
        return _Number(value)  # an integer
    return _Number(value, len(fraction or "") - exponent, len(written.lstrip("0")) or 1)


def _rational(text: str) -> Fraction | None:
    """A numerator or denominator (an integer or a decimal) as an exact value."""
    m = _PLAIN_RE.match(text)
    number = _decimal(*m.groups()[:3]) if m else None
    return number.value if number else None


def _as_number(s: str) -> _Number | None:
    """``s`` (already normalised) as a number when it is a plain number, fraction or scientific form."""
    if m := _PLAIN_RE.match(s):
        sign, whole, fraction, exponent = m.groups()
        return _decimal(sign, whole, fraction, int(exponent or 0))
    if m := _SCI_RE.match(s):
        mantissa, sign, exponent = m.group(1), m.group(2), int(m.group(3) or m.group(4))
        if abs(exponent) > _MAX_EXPONENT:
            return None
        if mantissa is None:  # "10^{8}": the power itself, exact
            return _Number(Fraction(-1 if sign == "-" else 1) * Fraction(10) ** exponent)
        ms, mw, mf, _ = _PLAIN_RE.match(mantissa).groups()
        return _decimal(ms, mw, mf, exponent)
    if m := _FRAC_RE.match(s):
        sign, numerator, denominator = m.group(1), _rational(m.group(2)), _rational(m.group(3))
    elif m := _SLASH_RE.match(s):
        sign, numerator, denominator = "", _rational(m.group(1)), _rational(m.group(2))
    else:
        return None
    if numerator is None or not denominator:
        return None
    value = numerator / denominator
    return _Number(-value if sign == "-" else value)


def _numbers_equal(pred: _Number, gold: _Number, rule: str) -> bool:
    """The numeric rule (see the module docstring): ``exact`` by default, ``qwen`` for the Qwen2.5-Math one."""
    p, g = pred.value, gold.value
    if rule == "qwen":  # math.isclose(p, x, rel_tol=1e-4) for x in (g / 100, g, g * 100), in exact arithmetic
        return any(abs(p - x) <= _QWEN_REL_TOL * max(abs(p), abs(x)) for x in (g / 100, g, g * 100))
    if p == g:
        return True
    if pred.places is None:  # an integer or fraction answer is exact: it must equal the gold
        return False
    if gold.places is not None:  # two decimals: rounds to the gold at its written places, and within 1e-4 of it
        return 2 * abs(p - g) < Fraction(10) ** -gold.places and abs(p - g) <= _DECIMAL_RTOL * abs(g)
    if g.denominator == 1:  # integers compare exactly
        return False
    # a decimal for a non-terminating fraction (0.333333 for 1/3): within one unit of its last digit
    return pred.digits >= _MIN_DIGITS_FOR_EXACT and abs(p - g) < Fraction(10) ** -pred.places


@functools.lru_cache(maxsize=8192)
def _parse_cached(expr: str) -> tuple:
    """math_verify's parse of one bare answer, memoised per process (references repeat k times)."""
    return tuple(parse(f"${expr}$", parsing_timeout=None))


def _strip_lhs(s: str) -> str:
    """``x=5`` -> ``5`` when the left side is a single (possibly subscripted) variable."""
    return s.split("=", 1)[1] if s.count("=") == 1 and _LHS_RE.match(s) else s


def is_equivalent(prediction: str, reference: str, numeric_rule: NumericRule = "exact") -> bool:
    """Whether an extracted answer equals the reference answer.

    ``numeric_rule`` decides how two plain numbers compare: ``"exact"`` (default) or ``"qwen"``, the
    Qwen2.5-Math harness's rule (relative 1e-4 and percent variants); see the module docstring.
    """
    if numeric_rule not in NUMERIC_RULES:
        raise ValueError(f"unknown numeric_rule {numeric_rule!r}; known: {', '.join(NUMERIC_RULES)}")
    prediction, reference = _code_to_latex(prediction.strip()), _code_to_latex(reference.strip())
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
    if pred_num is not None and ref_num is not None:  # final: sympy would round both to 6 decimal places
        return _numbers_equal(pred_num, ref_num, numeric_rule)
    gold, target = _parse_cached(reference.strip("$")), _parse_cached(prediction.strip("$"))
    if not gold or not target:
        return False
    try:
        return bool(verify(list(gold), list(target), timeout_seconds=None))
    except Exception:  # math_verify/sympy errors on exotic input mean "not shown equal"
        return False


def grade_math(completion: str, reference: str, numeric_rule: NumericRule = "exact") -> bool:
    """Whether ``completion``'s final answer equals ``reference`` (in-process, no time limit)."""
    answer = extract_answer(completion)
    return answer is not None and is_equivalent(answer, reference, numeric_rule)


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
                        advance()
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
                advance()
                worker.item, worker.deadline = None, math.inf
            now = time.monotonic()
            for worker in list(pool):
                if not worker.ready and now > worker.born + startup_timeout_s:
                    raise RuntimeError(f"a grading worker did not start within {startup_timeout_s} s")
                if worker.item is not None and now > worker.deadline:
                    stats.timeouts += 1
                    done += 1
                    advance()
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
    """The math benchmark grader: ``grade(problem, completion)`` with the reference in ``problem["answer"]``.

    ``numeric_rule`` (``"exact"`` or ``"qwen"``, see the module docstring) travels to the pool's workers
    inside the grading function.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        answer_key: str = "answer",
        memory_limit_mb: int | None = None,
        numeric_rule: NumericRule = "exact",
    ) -> None:
        if numeric_rule not in NUMERIC_RULES:
            raise ValueError(f"unknown numeric_rule {numeric_rule!r}; known: {', '.join(NUMERIC_RULES)}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.answer_key = answer_key
        self.memory_limit_mb = memory_limit_mb
        self.numeric_rule = numeric_rule
        self.grade_fn = functools.partial(grade_math, numeric_rule=numeric_rule)  # picklable, for spawn

    def reference(self, problem: Mapping[str, object]) -> str:
        if self.answer_key not in problem:
            raise KeyError(f"problem {problem.get('id', '?')!r} has no {self.answer_key!r} field")
        return str(problem[self.answer_key])

    def grade(self, problem: Mapping[str, object], completion: str) -> bool:
        """One completion, in this process (no time limit)."""
        return self.grade_fn(completion, self.reference(problem))

    def grade_batch(
        self, problems: Sequence[Mapping[str, object]], completions: Sequence[str]
    ) -> tuple[list[bool], GradingStats]:
        """``completions[i]`` against ``problems[i]``, in the process pool with the per-item time limit."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        pairs = [(c, self.reference(p)) for p, c in zip(problems, completions, strict=True)]
        return grade_math_batch(
            pairs,
            workers=self.workers,
            timeout_s=self.timeout_s,
            grade_fn=self.grade_fn,
            memory_limit_mb=self.memory_limit_mb,
        )
