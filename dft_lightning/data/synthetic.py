"""A small, self-generated math set for the demo and tests: word problems with worked solutions.

Each problem is built from a template with random quantities; its answer is computed, and the
solution walks through the arithmetic step by step and ends in ``\\boxed{answer}``. The ``train``
split uses two-step problems with small numbers; ``heldout`` and ``dev`` are unseen problems of the same
templates (each drawn from its own random stream; pass the other splits' problems as ``exclude`` and no
text repeats); the ``test`` split is harder (three steps, larger numbers), so it measures more than
memorisation of the templates. Generation is deterministic in ``seed``.

Not handled here: anything beyond integer arithmetic; this is a smoke-test set, not a benchmark.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]

Problem = tuple[str, list[str], int]


def _buy_bags(r: random.Random, hi: int) -> Problem:
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, hi), r.randint(2, 9), r.randint(2, hi)
    q = f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag. How many {item} does {n} have now?"
    steps = [f"The bags hold {b} \\times {c} = {b * c} {item}.", f"Together: {a} + {b * c} = {a + b * c}."]
    return q, steps, a + b * c


def _share(r: random.Random, hi: int) -> Problem:
    n, item = r.choice(NAMES), r.choice(ITEMS)
    k, each, gone = r.randint(2, 9), r.randint(2, hi), r.randint(1, hi)
    total = k * each + gone
    q = (f"{n} had {total} {item}, gave away {gone}, and shared the rest equally among {k} friends. "
         "How many did each friend get?")
    steps = [f"After giving away {gone}: {total} - {gone} = {total - gone}.",
             f"Shared among {k}: {total - gone} \\div {k} = {each}."]
    return q, steps, each


def _spend(r: random.Random, hi: int) -> Problem:
    n = r.choice(NAMES)
    price, count = r.randint(2, hi), r.randint(2, 9)
    money = price * count + r.randint(1, hi)
    q = f"{n} has {money} dollars and buys {count} tickets costing {price} dollars each. How many dollars are left?"
    steps = [f"The tickets cost {count} \\times {price} = {price * count} dollars.",
             f"Left: {money} - {price * count} = {money - price * count}."]
    return q, steps, money - price * count


def _extend(base: Callable[[random.Random, int], Problem]) -> Callable[[random.Random, int], Problem]:
    """Add a third step (doubling and adding a gift) to a two-step problem."""

    def harder(r: random.Random, hi: int) -> Problem:
        q, steps, ans = base(r, hi)
        extra = r.randint(2, hi)
        q = q.rstrip("?") + f", if that amount is then doubled and {extra} more are added?"
        d = 2 * ans
        steps = steps + [f"Doubled: 2 \\times {ans} = {d}; plus {extra}: {d} + {extra} = {d + extra}."]
        return q, steps, 2 * ans + extra

    return harder


TEMPLATES = {"train": [_buy_bags, _share, _spend], "test": [_extend(_buy_bags), _extend(_share), _extend(_spend)]}
LIMITS = {"train": 20, "test": 99}
#: splits drawn from the training templates, each from its own random stream
SAME_TEMPLATES = ("train", "heldout", "dev")
SPLITS = (*SAME_TEMPLATES, "test")


def generate(split: str, n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct problems of ``split`` (``train``, ``heldout``, ``dev`` or ``test``) as
    ``{id, problem, solution, answer}``, none of whose texts is in ``exclude``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    kind = "train" if split in SAME_TEMPLATES else "test"
    r = random.Random(f"{split}:{seed}")
    rows, seen = [], set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could only make {len(rows)} distinct {split} problems")
        q, steps, ans = r.choice(TEMPLATES[kind])(r, LIMITS[kind])
        if q in seen:
            continue
        seen.add(q)
        solution = "\n".join(steps + [f"The answer is $\\boxed{{{ans}}}$."])
        rows.append({"id": f"{split}-{len(rows)}", "problem": q, "solution": solution, "answer": str(ans)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path
