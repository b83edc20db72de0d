"""Benchmark math grading throughput: Math500 x 16 synthetic completions through the grading process pool.

The completions are built from the real Math500 file: correct boxed answers (some written differently
from the reference), other problems' answers, unboxed endings ("The answer is X", a trailing number),
long rambling text with and without a final box, and truncated generations. Prints the wall time,
items per second, the per-item timeout and error counts, and the accuracy in each category (a sanity
check: correct kinds near 100 %, wrong kinds near 0 %).

Usage: ``python tools/bench_grading.py [--source PATH] [--samples 16] [--workers 2] [--timeout 5]``.
It does not measure generation, and its completions are synthetic, not a model's.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from dft_lightning.evaluation.benchmarks.math import load_math_benchmark, load_rows
    from dft_lightning.evaluation.graders.math import grade_math_batch
except ModuleNotFoundError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO))
    from dft_lightning.evaluation.benchmarks.math import load_math_benchmark, load_rows
    from dft_lightning.evaluation.graders.math import grade_math_batch

DEFAULT_SOURCE = REPO / ".." / "shared" / "benchmarks" / "math500.jsonl"
_BOX = re.compile(r"\\boxed")

# kind -> (weight, whether the completion is correct by construction)
KINDS: dict[str, tuple[float, bool]] = {
    "solution_boxed": (0.25, True),  # the reference solution, which ends in \boxed{answer}
    "short_boxed": (0.10, True),  # a short paragraph and \boxed{answer}
    "restyled_boxed": (0.05, True),  # \dfrac, $...$ and \displaystyle around the answer
    "wrong_boxed": (0.20, False),  # another problem's solution and answer
    "answer_is": (0.10, True),  # no box: "The answer is $answer$."
    "trailing_number_wrong": (0.05, False),  # no box, no statement: the last number is arbitrary
    "rambling_boxed": (0.10, True),  # ~10-20 kB of unrelated working, then the right box
    "rambling_no_answer": (0.10, False),  # the same without any conclusion
    "truncated": (0.05, False),  # cut inside the final box
}


def _strip_boxes(text: str) -> str:
    return _BOX.sub(r"\\mathbf", text)


def build_completions(rows: list[dict], problems: list[dict], samples: int, seed: int = 0):
    """``(completion, reference, kind)`` for every problem x sample, deterministic for a seed."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    items = []
    for i, (row, problem) in enumerate(zip(rows, problems, strict=True)):
        answer = problem["answer"]
        for _ in range(samples):
            kind = rng.choices(kinds, weights)[0]
            other = rows[(i + rng.randrange(1, len(rows))) % len(rows)]
            if kind == "solution_boxed":
                text = row["solution"]
            elif kind == "short_boxed":
                text = f"Let me work this out.\nAfter simplifying, the result is $\\boxed{{{answer}}}$."
            elif kind == "restyled_boxed":
                text = f"So we get $\\boxed{{\\displaystyle {answer.replace(chr(92) + 'frac', chr(92) + 'dfrac')}}}$."
            elif kind == "wrong_boxed":
                text = other["solution"]
            elif kind == "answer_is":
                text = f"{_strip_boxes(row['solution'])}\n\nThe answer is ${answer}$."
            elif kind == "trailing_number_wrong":
                text = f"{_strip_boxes(other['solution'])}\nWe still need to check case {rng.randrange(1000, 9999)}"
            elif kind in ("rambling_boxed", "rambling_no_answer"):
                parts = [_strip_boxes(rng.choice(rows)["solution"]) for _ in range(rng.randint(10, 20))]
                text = "\nWait, let me reconsider.\n".join(parts)
                if kind == "rambling_boxed":
                    text += f"\nFinally, the answer is $\\boxed{{{answer}}}$."
                else:
                    text += "\nHmm, so the value must be x such that"
            else:  # truncated
                text = f"{_strip_boxes(row['solution'])}\nThus the answer is $\\boxed{{{answer[: len(answer) // 2]}"
            items.append((text, answer, kind))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="Math500 jsonl file")
    parser.add_argument("--samples", type=int, default=16, help="completions per problem")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-item limit in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = Path(args.source)
    if not source.is_file():
        print(f"Math500 file not found: {source.resolve()}", file=sys.stderr)
        return 2
    rows, _ = load_rows(source)
    problems = load_math_benchmark("math500", source)
    items = build_completions(rows, problems, args.samples, args.seed)
    chars = sum(len(text) for text, _, _ in items)
    print(
        f"{len(items)} completions ({chars / len(items):.0f} chars on average), {args.workers} workers, "
        f"{args.timeout:g} s per-item limit"
    )

    start = time.perf_counter()
    results, stats = grade_math_batch([(t, r) for t, r, _ in items], workers=args.workers, timeout_s=args.timeout)
    wall = time.perf_counter() - start

    print(
        f"wall time: {wall:.2f} s   items/s: {len(items) / wall:.1f}   "
        f"timeouts: {stats.timeouts}   errors: {stats.errors}"
    )
    totals, correct = Counter(), Counter()
    for (_, _, kind), ok in zip(items, results, strict=True):
        totals[kind] += 1
        correct[kind] += ok
    for kind in KINDS:
        if totals[kind]:
            expected = "correct" if KINDS[kind][1] else "wrong"
            print(
                f"  {kind:<24} {totals[kind]:>5} items   graded correct {100 * correct[kind] / totals[kind]:6.2f} %"
                f"   (all should be {expected})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
