"""``EvaluationCallback``: benchmark accuracy against the training step, during and around training.

At the chosen points (before the first step, every ``every_n_steps`` optimizer steps, at the end)
it exports HF weights (every rank takes part: FSDP2 shards are gathered; rank zero writes), runs
``python -m dft_lightning evaluate`` on them in a child process (so the engine's memory, GPU or
CPU, is returned when it exits), logs ``eval/<benchmark>/avg@k``, ``pass@k`` and the mean over
benchmarks at the global step to every logger, and keeps the generations with their grades and a
``summary.json`` under ``<log dir>/eval/step-<N>/``. Other ranks wait at a barrier meanwhile.

With ``shard_across_ranks: true`` every rank evaluates its share of the problems instead (each
child on its own GPU, reading the exported weights from a file system all ranks share), and the
per-benchmark sums are added up across ranks with torchmetrics, which gives exactly the metrics of
one unsharded run (per-group breakdowns of multimodal benchmarks stay in each rank's own
``summary.json``; ``run.combine_totals`` adds them up offline). The training process keeps its
memory during an evaluation: on GPUs lower ``engine.gpu_memory_utilization`` so vLLM fits beside it.

A benchmark ``source`` of ``data:val`` or ``data:test`` names the data module's own validation or
test file (the demo evaluates on its held-out split this way).

Not handled here: evaluating on several nodes at once, asynchronous evaluation while training goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from dft_lightning.errors import UserError
from dft_lightning.evaluation.run import SUMMED, BenchmarkSpec, EngineSpec, Sampling, format_table, metrics_from_totals

DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                   "GROUP_RANK", "TORCHELASTIC_RUN_ID")


class EvaluationCallback(L.Callback):
    """Evaluate exported checkpoints on benchmarks and log accuracy against the global step.

    Args:
        benchmarks: what to run (``name``, ``kind``, ``source``, ``limit``, ``template``, ``n``).
        every_n_steps: evaluate every this many optimizer steps; ``0``: only before/after.
        before_training: evaluate the starting weights (logged at step 0).
        at_end: evaluate the final weights.
        engine: ``hf`` or ``vllm`` and its settings.
        sampling: sampling settings (paper math: 16 samples at temperature 1.0).
        dirpath: where evaluations go (default ``<log dir>/eval``).
        keep_weights: keep the exported weights after evaluating (default: delete them, keep results).
        timeout_s: give up on one evaluation after this many seconds.
        shard_across_ranks: every rank evaluates a share of the problems (see the module doc).
    """

    def __init__(
        self, benchmarks: list[BenchmarkSpec], every_n_steps: int = 0, before_training: bool = False,
        at_end: bool = True, engine: EngineSpec | None = None, sampling: Sampling | None = None,
        dirpath: str | None = None, keep_weights: bool = False, timeout_s: float | None = None,
        shard_across_ranks: bool = False,
    ) -> None:
        if not benchmarks:
            raise UserError("EvaluationCallback needs at least one benchmark")
        self.benchmarks, self.every_n_steps = benchmarks, every_n_steps
        self.before_training, self.at_end = before_training, at_end
        self.engine, self.sampling = engine or EngineSpec(), sampling or Sampling()
        self.dirpath, self.keep_weights, self.timeout_s = dirpath, keep_weights, timeout_s
        self.shard_across_ranks = shard_across_ranks
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "eval"

    def _resolve(self, trainer: L.Trainer) -> list[BenchmarkSpec]:
        specs = []
        for spec in self.benchmarks:
            if spec.source in ("data:val", "data:test"):
                attribute = spec.source.split(":")[1]
                source = getattr(trainer.datamodule, attribute, None) if trainer.datamodule else None
                if not source:
                    raise UserError(f"benchmark {spec.name!r}: source {spec.source}, but the data module has no "
                                    f"{attribute} file")
                spec = replace(spec, source=str(source))
            specs.append(spec)
        return specs

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float] | None:
        """Export, evaluate in a child process (rank zero), log; returns the metrics on rank zero."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        folder = self._root(trainer) / f"step-{step}"
        weights = folder / "model"
        module.export_hf(weights)
        trainer.strategy.barrier("evaluation-export")
        sharded = self.shard_across_ranks and trainer.world_size > 1
        metrics, combined = None, None
        if sharded:
            rank, world = trainer.global_rank, trainer.world_size
            summary = self._run_child(weights, folder / f"rank-{rank}", step, trainer, shard=(rank, world),
                                      device=trainer.strategy.root_device)
            combined = self._sum_across_ranks(summary["totals"], module)
            metrics = metrics_from_totals(combined)
        elif trainer.is_global_zero:
            metrics = self._run_child(weights, folder, step, trainer)["metrics"]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self.history.append((step, metrics))
            if sharded:
                combined_summary = {"step": step, "shards": trainer.world_size, "metrics": metrics, "totals": combined}
                (folder / "summary.json").write_text(json.dumps(combined_summary, indent=2))
            rank_zero_info(f"[dft_lightning] evaluation at step {step}:\n{format_table(metrics)}")
        trainer.strategy.barrier("evaluation")
        if trainer.is_global_zero and not self.keep_weights:
            shutil.rmtree(weights, ignore_errors=True)
        return metrics

    @staticmethod
    def _sum_across_ranks(totals: dict[str, dict[str, float]], module: L.LightningModule) -> dict:
        """Add each rank's per-benchmark sums with torchmetrics (synchronised over the process group)."""
        from torchmetrics import SumMetric

        combined = {}
        for name in sorted(totals):
            combined[name] = {"k": totals[name]["k"]}
            for key in SUMMED:
                metric = SumMetric().to(module.device)
                metric.update(float(totals[name][key]))
                combined[name][key] = float(metric.compute())
        return combined

    def _run_child(
        self, weights: Path, folder: Path, step: int, trainer: L.Trainer, shard: tuple[int, int] | None = None,
        device=None,
    ) -> dict:
        """Run ``python -m dft_lightning evaluate`` and return its ``summary.json``."""
        config = {
            "model": str(weights), "benchmarks": [asdict(b) for b in self._resolve(trainer)],
            "engine": asdict(self.engine), "sampling": asdict(self.sampling), "output_dir": str(folder), "step": step,
            "shard": list(shard) if shard else None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / "evaluate.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        if device is not None and getattr(device, "type", "cpu") == "cuda":  # this rank's GPU only
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(device.index + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ids[device.index]
        log_path = folder / "evaluate.log"
        with log_path.open("w") as log:
            result = subprocess.run(
                [sys.executable, "-m", "dft_lightning", "evaluate", "--config", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=self.timeout_s,
            )
        if result.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"evaluation at step {step} failed (exit {result.returncode}); log {log_path}:\n{tail}")
        return json.loads((folder / "summary.json").read_text())

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.before_training and trainer.global_step == 0:
            self.evaluate(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.at_end:
            self.evaluate(trainer, module)
        if trainer.is_global_zero and len(self.history) > 1:
            first, last = self.history[0], self.history[-1]
            rank_zero_info(f"[dft_lightning] eval/mean/avg: {first[1]['eval/mean/avg']:.4f} at step {first[0]}, "
                           f"{last[1]['eval/mean/avg']:.4f} at step {last[0]}")
