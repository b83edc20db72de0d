"""Build the offline-RL data of the DFT paper's Table 2: sample k responses per math question, grade them, keep
the correct ones as training rows (and, with ``--pairs``, correct / incorrect pairs for preference methods).

Paper, section 4.2: 100,000 NuminaMath-CoT questions, four responses each at temperature 1.0 from the base model
itself, the correct ones (by math_verify) kept: about 140,000 rows; 100,000 pairs for DPO::

    python tools/build_offline_rl.py --model Qwen/Qwen2.5-Math-1.5B --data AI-MO/NuminaMath-CoT --sample 100000 \\
        --k 4 --temperature 1.0 --engine vllm --pairs --out data/offline_rl/qwen2.5-math-1.5b
    torchrun --nproc-per-node 8 tools/build_offline_rl.py ...      # 8 shards, one per GPU (RANK / WORLD_SIZE)
    python tools/build_offline_rl.py --out data/offline_rl/qwen2.5-math-1.5b --merge     # report over all shards

Questions are rows read through ``dft_lightning.rows`` (local json / jsonl / parquet, directories, hub ids): the
problem is the first of ``--problem-field`` (default ``problem``, ``question``, ``prompt``; a string or a list of
chat turns, whose last user turn is taken), the gold answer the first of ``--answer-field`` (default ``answer``,
``final_answer``) or else the last ``\\boxed{}`` of ``--solution-field`` (default ``solution``: NuminaMath-CoT has
no answer field). ``--source-field`` (``source``) and ``--level-field`` (``level``, ``difficulty``) group the
report. A row without a problem or a gold answer (or a malformed line) is skipped, counted and named in the report.

Prompts, seeds and grading are the evaluation code's: ``MathBenchmark``'s prompt templates (``--template``,
default ``qwen-boxed``: train on it with ``data.prompt_style: boxed``), the engines of
``dft_lightning.evaluation.engines`` (``--engine hf`` or ``vllm``) with sample ``j`` of the question with data
index ``i`` seeded ``seed + i * k + j`` (so a question's samples do not depend on the shard, the chunk or a
restart; with ``hf`` they are the same rows), and the math grader's process pool (``MathGrader``). A correct
sample that ran into ``--max-tokens`` is not kept unless ``--keep-truncated`` (counted in ``correct`` but not in
``rows``); pairs take kept correct samples as ``chosen`` and incorrect ones as ``rejected``, in sample order, each
sample in one pair at most (``min(correct, incorrect)`` pairs per question, ``--max-pairs-per-question`` caps it).

Output (files in ``tools/offline_rl_store.py``'s docstring; rows in ``docs/offline_rl.md``): ``OUT/train/``
holds one row per kept response (``problem``, ``response``, ``verified``, ``answer``, ``question_id``, ``index``,
``sample``, ``source``, ``level``, ``finish_reason``), read as is by ``MathDataModule`` with
``data.source_format: rejection`` and ``data.train: OUT/train`` (all shards' files); ``OUT/pairs/`` one row per
pair (``prompt``, ``chosen``, ``rejected``, ``answer``, ``question_id``, ``index``, ``chosen_sample``,
``rejected_sample``, ``source``, ``level``). Rerunning the same command resumes (see the store's docstring);
settings that change the rows (model, data, k, sampling, template, ...) must stay the same, or the build stops
with an error naming them. Progress is one line per chunk on a terminal, else a plain line every
``--progress-every`` seconds.

Shards: ``--shard i/n`` or the launcher's ``RANK`` / ``WORLD_SIZE`` (torchrun; ``SLURM_PROCID`` /
``SLURM_NTASKS``): shard ``i`` takes every ``n``-th selected question from ``i`` and writes its own files; under
torchrun each one uses the GPU(s) of its ``LOCAL_RANK``. Not handled: changing the number of shards of a started
build, code or multimodal data, and PPO / GRPO (online RL: no fixed data set).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_rl_store import (  # noqa: E402
    ShardStore,
    StoreError,
    combined_report,
    format_report,
    summarize,
    write_json_atomic,
)

from dft_lightning.errors import UserError  # noqa: E402
from dft_lightning.evaluation.benchmarks.math import PROMPT_TEMPLATES, MathBenchmark  # noqa: E402
from dft_lightning.evaluation.engines import (  # noqa: E402
    HFEngine,
    SamplingParams,
    VLLMEngine,
    VLLMUnavailableError,
)
from dft_lightning.evaluation.graders.math import MathGrader, extract_boxed  # noqa: E402
from dft_lightning.progress import Progress  # noqa: E402
from dft_lightning.rows import BadRow, iter_rows  # noqa: E402

#: settings that change which rows are written: a restart with other values is refused
ROW_SETTINGS = ("model", "data", "split", "subset", "problem_field", "answer_field", "solution_field", "source_field",
                "level_field", "limit", "sample", "data_seed", "k", "temperature", "top_p", "max_tokens", "seed",
                "template", "numeric_rule", "keep_truncated", "pairs", "max_pairs_per_question", "engine", "dtype")


@dataclass(frozen=True)
class Question:
    index: int          # position in the data (seeds come from it)
    row: str            # the row's name, e.g. train.jsonl:7
    qid: str            # the row's id / unique_id field, else its name
    problem: str
    answer: str
    source: str | None
    level: str | None


@dataclass(frozen=True)
class Skip:
    index: int
    row: str
    reason: str
    detail: str


# ------------------------------------------------------------------------------------------------- questions


def _first(row: dict[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    return next(((n, row[n]) for n in names if row.get(n) not in (None, "", [])), None)


def _text(value: Any) -> str | None:
    """A string, or the last user turn of a list of chat turns; ``None`` for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        turns = [m.get("content") for m in value if m.get("role") == "user"]
        return turns[-1] if turns and isinstance(turns[-1], str) else None
    return None


def _answer(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def to_question(index: int, name: str, row: Any, args: argparse.Namespace) -> Question | Skip:
    """The question of one data row, or why it is skipped."""
    if isinstance(row, BadRow):
        return Skip(index, name, row.reason, row.detail)
    found = _first(row, args.problem_field)
    if found is None:
        return Skip(index, name, "missing_problem", f"no field {' / '.join(args.problem_field)}")
    problem = _text(found[1])
    if problem is None or not problem.strip():
        return Skip(index, name, "bad_problem", f"field {found[0]!r} is not a string or a chat with a user turn")
    answer = _first(row, args.answer_field)
    if answer is not None:
        gold = _answer(answer[1])
    else:
        solution = _first(row, args.solution_field)
        if solution is None:
            fields = " / ".join([*args.answer_field, *args.solution_field])
            return Skip(index, name, "missing_answer", f"no field {fields}")
        gold = extract_boxed(str(solution[1])) or ""
        if not gold.strip():
            return Skip(index, name, "missing_answer", f"no \\boxed{{}} answer in field {solution[0]!r}")
    qid = next((str(row[k]) for k in ("id", "unique_id", "uuid") if row.get(k) not in (None, "")), name)
    source = _first(row, args.source_field)
    level = _first(row, args.level_field)
    return Question(index, name, qid, problem, gold, None if source is None else str(source[1]),
                    None if level is None else str(level[1]))


def read_questions(args: argparse.Namespace) -> list[Question | Skip]:
    """The selected rows (all, the first ``--limit``, or ``--sample`` at random), as questions or skips."""
    rows = iter_rows(args.data, key="--data", split=args.split, name=args.subset)
    # converted while reading: only the question and its answer stay in memory, not the rows' other fields
    items = [to_question(i, name, row, args) for i, (name, row) in enumerate(itertools.islice(rows, args.limit))]
    if args.sample is not None:
        if args.sample > len(items):
            raise UserError(f"--sample {args.sample}: the data has only {len(items)} rows")
        items = [items[i] for i in sorted(random.Random(args.data_seed).sample(range(len(items)), args.sample))]
    return items


def digest(items: Sequence[Question | Skip]) -> str:
    """A fingerprint of the selected questions: a restart on changed data is refused."""
    h = hashlib.sha256()
    for item in items:
        fields = [item.index, item.row, item.problem, item.answer] if isinstance(item, Question) else \
            [item.index, item.row, item.reason]
        h.update(json.dumps(fields, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- shards


def shard_of(spec: str | None) -> tuple[int, int]:
    """``(index, count)`` from ``--shard i/n``, else torchrun's RANK / WORLD_SIZE or SLURM's, else (0, 1)."""
    if spec is None:
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if os.environ.get(rank) is not None and os.environ.get(size) is not None:
                spec = f"{os.environ[rank]}/{os.environ[size]}"
                break
        else:
            return 0, 1
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {spec!r}: need 0 <= i < n")
    return index, count


def _local_gpus(per_shard: int) -> list[str] | None:
    """The GPUs of this process under torchrun (``LOCAL_RANK``): ``per_shard`` of the visible ones."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mine = ids[int(local) * per_shard : (int(local) + 1) * per_shard]
    if len(mine) < per_shard:
        raise UserError(f"LOCAL_RANK {local} needs {per_shard} GPU(s) but only {len(ids)} are visible")
    return mine


def make_engine(args: argparse.Namespace):
    if args.engine == "vllm":
        gpus = _local_gpus(args.tensor_parallel_size)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
        return VLLMEngine(args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                          gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                          seed=args.seed, kv_cache_memory_bytes=args.kv_cache_bytes, python=args.python, env=env)
    device = args.device
    if device is None and _local_gpus(1):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # an index among the visible GPUs
    return HFEngine(args.model, dtype="float32" if args.dtype == "auto" else args.dtype,
                    batch_size=args.batch_size, device=device)


# ---------------------------------------------------------------------------------------------------- build


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``build.json`` on the first start; later starts (any shard) must have the same settings."""
    path = out / "build.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        if changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(f"{out} was started with other settings ({detail}); rerun with the same ones or "
                            "choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def _rows_of(q: Question, completions, grades: list[bool], args) -> tuple[list[dict], list[dict], dict]:
    """Training rows, pairs and the manifest entry of one question."""
    keep = [j for j, (c, ok) in enumerate(zip(completions, grades, strict=True))
            if ok and (args.keep_truncated or c.finish_reason != "length")]
    wrong = [j for j, ok in enumerate(grades) if not ok]
    where = {"question_id": q.qid, "index": q.index}
    group = {"source": q.source, "level": q.level}
    rows = [{"problem": q.problem, "response": completions[j].text, "verified": True, "answer": q.answer, **where,
             "sample": j, **group, "finish_reason": completions[j].finish_reason} for j in keep]
    n_pairs = min(len(keep), len(wrong))
    if args.max_pairs_per_question is not None:
        n_pairs = min(n_pairs, args.max_pairs_per_question)
    pairs = [{"prompt": q.problem, "chosen": completions[a].text, "rejected": completions[b].text,
              "answer": q.answer, **where, "chosen_sample": a, "rejected_sample": b, **group}
             for a, b in zip(keep[:n_pairs], wrong[:n_pairs], strict=True)] if args.pairs else []
    entry = {"index": q.index, "status": "ok", "row": q.row, "id": q.qid, **group, "correct": grades,
             "finish": [c.finish_reason for c in completions], "rows": len(rows), "pairs": len(pairs)}
    return rows, pairs, entry


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) one shard; returns the report over every shard's manifest."""
    out = Path(args.out)
    index, count = shard_of(args.shard)
    items = read_questions(args)
    settings = {k: getattr(args, k) for k in ROW_SETTINGS}
    settings.update(shards=count, selected_rows=len(items), data_digest=digest(items))
    _check_settings(out, settings)
    mine = items[index::count]
    label = f"shard {index}/{count}"
    store = ShardStore(out, index, count, pairs=args.pairs)
    try:
        done, fixes = store.recover()
        if done:
            cut = f", cut {fixes['rows_dropped']} rows and {fixes['pairs_dropped']} pairs of unfinished questions" \
                  f" and {fixes['partial_lines']} partial line(s)" if any(fixes.values()) else ""
            print(f"{label}: resuming: {len(done)} of {len(mine)} questions done{cut}", file=sys.stderr)
        skips = [s for s in mine if isinstance(s, Skip) and s.index not in done]
        store.manifest.append({"index": s.index, "status": "skipped", "row": s.row, "reason": s.reason,
                               "detail": s.detail} for s in skips)
        pending = [q for q in mine if isinstance(q, Question) and q.index not in done]
        if pending:
            questions = sum(isinstance(q, Question) for q in mine)
            with Progress(label, questions, "questions", every_s=args.progress_every,
                          start=questions - len(pending)) as progress:
                _generate(args, store, pending, progress)
        else:
            print(f"{label}: nothing to do: all {len(mine)} questions are done", file=sys.stderr)
        entries = store.manifest.read()[0]
        write_json_atomic(store.report_file, summarize(entries))
        write_json_atomic(store.done_file, {"questions": len(mine)})
    finally:
        store.close()
    report = combined_report(out, count)
    write_json_atomic(out / "report.json", report)
    return report


def _generate(args: argparse.Namespace, store: ShardStore, pending: list[Question], progress: Progress) -> None:
    grader = MathGrader(workers=args.grader_workers, timeout_s=args.grader_timeout, numeric_rule=args.numeric_rule)
    bench = MathBenchmark("math500", template=args.template, grader=grader, name="offline_rl", problems=[])
    params = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            stop=tuple(bench.stop_sequences()), seed=args.seed)
    written = 0
    with make_engine(args) as engine:
        for start in range(0, len(pending), args.chunk):
            chunk = pending[start : start + args.chunk]
            bench.problems = [{"id": q.qid, "question": q.problem, "answer": q.answer} for q in chunk]
            samples = engine.generate_completions(bench.prompts(), params, [q.index for q in chunk])
            grades, stats = bench.grade_samples([[c.text for c in per_question] for per_question in samples])
            if getattr(stats, "timeouts", 0):
                print(f"warning: {stats.timeouts} sample(s) ran past the grader's {args.grader_timeout} s limit "
                      "and count as incorrect", file=sys.stderr)
            rows, pairs, entries = [], [], []
            for q, completions, marks in zip(chunk, samples, grades, strict=True):
                r, p, e = _rows_of(q, completions, marks, args)
                rows += r
                pairs += p
                entries.append(e)
            store.train.append(rows)  # rows first, the manifest last: see offline_rl_store
            if store.pairs is not None:
                store.pairs.append(pairs)
            store.manifest.append(entries)
            written += len(rows)
            progress.detail = f"{written} rows this run"
            progress.update(len(chunk))


def merge(out: Path) -> dict[str, Any]:
    """The report over all shards of a build (``--merge``)."""
    path = out / "build.json"
    if not path.exists():
        raise UserError(f"{out}: no build.json; not an offline-RL data folder")
    report = combined_report(out, int(json.loads(path.read_text())["shards"]))
    write_json_atomic(out / "report.json", report)
    return report


# ------------------------------------------------------------------------------------------------------ CLI


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/build_offline_rl.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (train/, pairs/, state/, report.json)")
    p.add_argument("--merge", action="store_true", help="only write and print the report over all shards")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="math rows: local json/jsonl/parquet (file or folder) or a hub id")
    d.add_argument("--split", default="train")
    d.add_argument("--subset", default=None, help="hub configuration name")
    d.add_argument("--problem-field", type=_names, default=["problem", "question", "prompt"])
    d.add_argument("--answer-field", type=_names, default=["answer", "final_answer"])
    d.add_argument("--solution-field", type=_names, default=["solution"], help="gold: its last \\boxed{}")
    d.add_argument("--source-field", type=_names, default=["source"])
    d.add_argument("--level-field", type=_names, default=["level", "difficulty"])
    d.add_argument("--limit", type=int, default=None, help="the first N rows only")
    d.add_argument("--sample", type=int, default=None, help="N rows at random (paper: 100,000)")
    d.add_argument("--data-seed", type=int, default=42, help="seed of --sample")
    s = p.add_argument_group("sampling and grading")
    s.add_argument("--model", help="hub id, HF folder, GGUF or tiny:qwen2")
    s.add_argument("--k", type=int, default=4, help="responses per question")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-tokens", type=int, default=4096)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--template", default="qwen-boxed", choices=sorted(PROMPT_TEMPLATES))
    s.add_argument("--numeric-rule", default="exact", choices=["exact", "qwen"])
    s.add_argument("--keep-truncated", action="store_true", help="keep correct samples that hit --max-tokens")
    s.add_argument("--pairs", action="store_true", help="also write chosen/rejected pairs")
    s.add_argument("--max-pairs-per-question", type=int, default=None)
    s.add_argument("--grader-workers", type=int, default=2, help="0: grade in this process, no time limit")
    s.add_argument("--grader-timeout", type=float, default=5.0)
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=["hf", "vllm"], default="vllm")
    e.add_argument("--dtype", default="auto", help="hf: auto means float32")
    e.add_argument("--chunk", type=int, default=None, help="questions per engine call and per manifest write "
                   "(default: 1024 for vllm, which starts an engine per call; 32 for hf)")
    e.add_argument("--batch-size", type=int, default=32, help="hf: sequences decoded at once")
    e.add_argument("--device", default=None, help="hf: cuda, cuda:1, cpu (default: the LOCAL_RANK GPU or cuda)")
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--kv-cache-bytes", type=int, default=None, help="vllm: a fixed KV-cache size")
    e.add_argument("--python", default=None, help="vllm: an interpreter of an environment with vllm")
    p.add_argument("--shard", default=None, help="i/n (default: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines (no TTY)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.merge:
        report = merge(Path(args.out))
    else:
        for name in ("data", "model"):
            if getattr(args, name) is None:
                raise UserError(f"--{name} is required (or --merge)")
        if args.k < 1 or (args.chunk is not None and args.chunk < 1):
            raise UserError("--k and --chunk must be positive")
        args.chunk = args.chunk or (1024 if args.engine == "vllm" else 32)
        report = build(args)
    print(format_report(report))
    print(f"report: {Path(args.out) / 'report.json'}; training rows: {Path(args.out) / 'train'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (UserError, StoreError, VLLMUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
