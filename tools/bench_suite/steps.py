"""Objective step time (DFT / SFT, iw-SFT / SFT) and end-to-end ``fit`` throughput."""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_suite.common import (
    DEMO_MODEL,
    DFT,
    IWSFT,
    REPO,
    SFT,
    MicroBatch,
    Objective,
    Result,
    Section,
    TokenStats,
    _goal,
    _quartiles,
    _supervised,
    _sync,
    _timed_step,
    _to,
)


# -- 1 + 2: objective step time ------------------------------------------------------------------
def bench_objectives(args: argparse.Namespace, which: set[str], device: torch.device) -> Section:
    """DFT / SFT and iw-SFT / SFT step-time ratios on one model and one micro-batch."""
    from dft_lightning.data.demo import DemoMathDataModule
    from dft_lightning.module import FineTuneModule

    model = args.step_model or ("tiny:qwen2" if args.quick else DEMO_MODEL)
    warmup, reps = (1, 5) if args.quick else (2, args.reps)
    section = Section("objective step time")
    torch.manual_seed(0)
    precomputed = None
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = DemoMathDataModule(num_train=32, num_test=4, tokenizer=model, batch_size=16, micro_batch_size=4,
                                  data_dir=tmp)
        data.setup("fit")
        if "iwsft" in which:  # the reference's log-probs of these rows, written and attached as training does
            from dft_lightning.precomputed import PrecomputedReference, precompute

            path = precompute(data, model, Path(tmp) / "reference.pt", device=device, progress=False)
            PrecomputedReference.load(path).attach(data)
            precomputed = FineTuneModule(model, objective=IWSFT(), reference=f"precomputed:{path}")
            precomputed.configure_model()
            precomputed.to(device)
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
        objectives["iwsft_precomputed"] = IWSFT()  # on the module without a reference model
    runs_on = {name: precomputed if name == "iwsft_precomputed" else module for name in objectives}
    params = sum(p.numel() for p in module.model.parameters())
    rows, width = batch[0].input_ids.shape
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
            elapsed = _timed_step(runs_on[name], batch, objectives[name], device)
            if rep >= warmup:
                times[name].append(elapsed)
    for name in names:
        print(f"  {name:>6}: median {statistics.median(times[name]) * 1e3:8.1f} ms per step "
              f"(min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})")
    goal = "<= 1.02 at full sizes (quick sizes here)" if args.quick else "<= 1.02"
    for name in [n for n in names[1:] if n != "iwsft_precomputed"]:
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
    if precomputed is not None:
        section.results += _precomputed_rows(times, goal="<= 1.05 at full sizes (quick sizes here)" if args.quick
                                             else "<= 1.05", quick=args.quick)
        section.settings.append(
            "precomputed reference: the same rows' reference log-probs written by dft_lightning.precomputed.precompute "
            "(the starting model, float32), attached to the data module's rows and carried by the micro-batch; "
            "iw-SFT then runs on a module that loads no reference model (model.reference=precomputed:<file>)"
        )
        del precomputed
    if "dft" in objectives:
        # DFT requires no extra statistic, so its forward and the backward through the model are SFT's own code;
        # it differs only in the objective applied to the [rows, time] log-probs. Timing that part alone, many
        # times, resolves a difference far below the noise of a whole step on a shared machine.
        loss_reps = 50 if args.quick else 2000
        zoo = _zoo(module)
        extra = _objective_times({**objectives, **zoo}, batch[0], device, loss_reps)
        delta = statistics.median(extra["dft"]) - statistics.median(extra["sft"])
        derived = 1 + delta / statistics.median(times["sft"])
        section.results.append(Result(
            "dft_sft_step_ratio", "DFT / SFT step time: SFT step + DFT's extra objective time, over the SFT step",
            derived, f"{derived:.5f} (DFT objective + its backward {delta * 1e6:+.0f} us against SFT's; "
                     f"{loss_reps} repetitions)", goal, None if args.quick else _goal(derived, 1.02, at_most=True),
        ))
        for name in zoo:  # the other objectives that need no extra statistic or model, the same way
            delta = statistics.median(extra[name]) - statistics.median(extra["sft"])
            ratio = 1 + delta / statistics.median(times["sft"])
            section.results.append(Result(
                f"{name.lower()}_sft_step_ratio", f"{name} / SFT step time (SFT step + its extra objective time)",
                ratio, f"{ratio:.5f} ({delta * 1e6:+.0f} us)", goal,
                None if args.quick else _goal(ratio, 1.02, at_most=True)))
        section.settings.append(
            f"DFT's extra time: objective + backward from the [rows, time - 1] log-probs of the same micro-batch "
            f"(a leaf tensor), SFT and DFT interleaved, {loss_reps} repetitions each, medians compared; the derived "
            "ratio adds that difference to the median SFT step"
        )
    del module
    gc.collect()
    return section


def _precomputed_rows(times: dict[str, list[float]], goal: str, quick: bool) -> list[Result]:
    """iw-SFT with precomputed reference log-probs against the live reference and against SFT."""
    rows = []
    for key, label, base, row_goal in (
        ("iwsft_precomputed_live_step_ratio", "precomputed-reference iw-SFT step / live-reference step", "iwsft",
         "report (< 1: the reference forward saved)"),
        ("iwsft_precomputed_sft_step_ratio", "iw-SFT (precomputed reference) step / SFT step", "sft", goal),
    ):
        ratios = [a / b for a, b in zip(times["iwsft_precomputed"], times[base], strict=True)]
        ratio = statistics.median(ratios)
        low, high = _quartiles(ratios)
        met = None if quick or base != "sft" else _goal(ratio, 1.05, at_most=True)
        rows.append(Result(key, label, ratio, f"{ratio:.3f} (IQR {low:.3f}-{high:.3f}; {base} "
                           f"{statistics.median(times[base]) * 1e3:.0f} ms, precomputed "
                           f"{statistics.median(times['iwsft_precomputed']) * 1e3:.0f} ms)", row_goal, met))
    return rows


def _zoo(module: Any) -> dict[str, Objective]:
    """The objectives that need no statistic or model beyond the target log-probs (SADFT: its token classes)."""
    from dft_lightning.objectives import CHORD, SADFT, DFTSequence, Focal, ProbPower

    sadft = SADFT()
    sadft.setup(module.tokenizer)
    return {"DFTSequence": DFTSequence(length_normalised=True), "ProbPower": ProbPower(alpha=1.0),
            "CHORD": CHORD(), "Focal": Focal(), "SADFT": sadft}


def _objective_times(objectives: dict[str, Objective], batch: MicroBatch, device: torch.device,
                     reps: int) -> dict[str, list[float]]:
    """Seconds of ``objective(stats).loss.backward()`` alone, per objective without extra requirements."""
    mask = batch.target_mask
    logp = (-torch.rand(mask.shape, device=device) * 3).requires_grad_(True)
    stats = TokenStats(logp=logp, mask=mask, sequence=batch.sequence_ids[:, 1:],
                       num_tokens=mask.sum().float(), targets=batch.labels[:, 1:])
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
