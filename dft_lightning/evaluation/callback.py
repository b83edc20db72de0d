"""``EvaluationCallback``: benchmark accuracy against the training step, during and around training.

At the chosen points (before the first step, every ``every_n_steps`` optimizer steps, at the end)
it exports HF weights (every rank takes part: FSDP2 shards are gathered; rank zero writes), runs
``python -m dft_lightning evaluate`` on them in a child process (so the engine's memory, GPU or
CPU, is returned when it exits), logs ``eval/<benchmark>/avg@k``, ``pass@k`` and the mean over
benchmarks at the global step to every logger, and keeps the generations with their grades and a
``summary.json`` under ``<log dir>/eval/step-<N>/``.

With ``shard_across_ranks: true`` every rank evaluates its share of the problems instead (each
child on its own GPU, reading the exported weights from a file system all ranks share), and the
per-benchmark sums are added up across ranks, which gives exactly the metrics of one unsharded run
(per-group breakdowns of multimodal benchmarks stay in each rank's own ``summary.json``;
``run.combine_totals`` adds them up offline). Samples are seeded by each problem's index in the
whole benchmark, so with ``engine.kind: hf`` the sharded completions are the unsharded ones. The
training process keeps its memory during an evaluation: on GPUs lower ``engine.gpu_memory_utilization``
so vLLM fits beside it.

Waiting: no rank sits in a collective while a child runs, so an evaluation may last longer than the
process group's timeout (30 minutes by default). The children run in their own sessions and every rank
polls: once a second all ranks exchange their child's state (running, done, failed, timed out) in one
small all-reduce, until none is running. Every rank then knows how every rank's child ended, and all of
them take the same way: the metrics (sharded: summed across ranks first), or, when any child failed,
``eval/failed`` = 1 at that step (0 after a successful evaluation) and a warning naming the failed ranks'
logs (``on_failure: log``, the default; training goes on), or the same one-line error on every rank
(``on_failure: raise``). ``timeout_s`` bounds one evaluation: the child's process group is interrupted
(SIGINT, so the evaluation can stop its own engine), killed 30 s later, and the evaluation counts as failed.

Progress: the child writes its own (problems generated, completions graded, rate, ETA) as plain lines into its
``evaluate.log``; while waiting, rank zero relays the newest of them to its output every
``DFT_LIGHTNING_PROGRESS_EVERY_S`` seconds (default 30), as ``[dft_lightning] evaluation at step N: ...``.

``command_prefix`` wraps the evaluation command (``[prefix..., python, -m, dft_lightning, evaluate,
--config, <dir>/evaluate.json]``), e.g. ``[nice, -n, "10"]`` or ``[numactl, --cpunodebind=0]``.

Benchmarks are given as in ``evaluate`` (``class_path`` / ``init_args``, or the short form ``{name, kind, source,
...}``); the child receives them as JSON, so ``init_args`` must be plain values (YAML/JSON data), and a class path
must be importable in the child too (on ``PYTHONPATH``, which the child inherits). Each benchmark's class and
arguments are checked when the callback is built, before training starts. A benchmark ``source`` of ``data:val``
or ``data:test`` names the data module's own validation or test file (the demo evaluates on its held-out split
this way). The child judges ``prompt_style: auto`` by the name of the checkpoint training started from
(``model.pretrained``), not by the exported folder's name.

Not handled here: evaluating on several nodes at once, asynchronous evaluation while training goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dft_lightning.errors import UserError, signal_ending
from dft_lightning.evaluation._vllm_worker import kill_group
from dft_lightning.evaluation.engine_base import DISTRIBUTED_ENV
from dft_lightning.evaluation.run import (
    SUMMED,
    BenchmarkConfig,
    BenchmarkSpec,
    EngineSpec,
    Sampling,
    format_table,
    metrics_from_totals,
)
from dft_lightning.progress import default_every_s

# How a rank's evaluation child stands; exchanged across ranks as integers.
RUNNING, DONE, FAILED, TIMED_OUT = 0, 1, 2, 3


def _ended(code: int) -> str:
    """How a child process ended, for the failure line: ``exit status 3`` or ``killed by SIGKILL ...``."""
    return f"exit status {code}" if code >= 0 else f"killed by {signal_ending(code)}"


class EvaluationFailed(UserError):
    """An evaluation inside training failed (``on_failure: raise``); the message names the ranks and their logs."""


class _Child:
    """One ``evaluate`` child in its own session, polled rather than waited for. ``state`` is RUNNING until it
    ends: DONE (exit 0 and a readable ``summary.json``), FAILED or TIMED_OUT; ``reason`` says why it failed."""

    stop_grace_s = 30.0

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, summary_path: Path,
                 timeout_s: float | None) -> None:
        self.log_path, self.summary_path, self.timeout_s = log_path, summary_path, timeout_s
        self.state, self.reason, self.summary = RUNNING, "", None
        self.started = time.monotonic()
        with log_path.open("wb") as log:
            try:
                self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True)
            except OSError as e:  # e.g. a command_prefix that does not exist
                self.proc = None
                log.write(f"cannot start {command[0]!r}: {e}\n".encode())
                self.state, self.reason = FAILED, f"cannot start {command[0]!r}: {e.strerror or e}"

    def poll(self) -> int:
        if self.state != RUNNING:
            return self.state
        code = self.proc.poll()
        if code is None:
            if self.timeout_s is not None and time.monotonic() - self.started > self.timeout_s:
                self.stop()
                self.state, self.reason = TIMED_OUT, f"timed out after {self.timeout_s:g} s"
            return self.state
        kill_group(self.proc.pid)  # helpers it left behind
        if code != 0:
            self.state, self.reason = FAILED, _ended(code)
            return self.state
        try:
            self.summary = json.loads(self.summary_path.read_text())
            self.state = DONE
        except (OSError, ValueError) as e:
            self.state, self.reason = FAILED, f"no readable {self.summary_path.name}: {e}"
        return self.state

    def stop(self) -> None:
        """Interrupt the child's process group, then kill it if it is still there after ``stop_grace_s``."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=self.stop_grace_s)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
        kill_group(self.proc.pid)
        self.proc.wait()

    def progress_line(self) -> str | None:
        """The newest progress line (``generating: ...`` / ``grading: ...``) the child wrote to its log."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines()]
        return next((line for line in reversed(lines) if line.startswith(("generating:", "grading:"))), None)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class EvaluationCallback(L.Callback):
    """Evaluate exported checkpoints on benchmarks and log accuracy against the global step.

    Args:
        benchmarks: what to run: ``{class_path, init_args, name, limit, n, max_tokens}`` or the short form
            ``{name, kind, source, limit, template, ...}`` (see ``run.BenchmarkSpec``; specs work from Python).
        every_n_steps: evaluate every this many optimizer steps; ``0``: only before/after.
        before_training: evaluate the starting weights (logged at step 0).
        at_end: evaluate the final weights.
        engine: ``hf`` or ``vllm`` and its settings.
        sampling: sampling settings (paper math: 16 samples at temperature 1.0).
        dirpath: where evaluations go (default ``<log dir>/eval``).
        keep_weights: keep the exported weights after evaluating (default: delete them, keep results).
        timeout_s: give up on one evaluation after this many seconds (it then counts as failed).
        shard_across_ranks: every rank evaluates a share of the problems (see the module doc).
        on_failure: ``log``: a failed evaluation logs ``eval/failed`` = 1 and a warning, training goes on;
            ``raise``: every rank stops with the same one-line error.
        command_prefix: words put before the evaluation command (a wrapper such as ``[nice, -n, "10"]``).
    """

    poll_s = 1.0  # how often the ranks compare their children's states

    def __init__(
        self, benchmarks: list[BenchmarkConfig], every_n_steps: int = 0, before_training: bool = False,
        at_end: bool = True, engine: EngineSpec | None = None, sampling: Sampling | None = None,
        dirpath: str | None = None, keep_weights: bool = False, timeout_s: float | None = None,
        shard_across_ranks: bool = False, on_failure: Literal["log", "raise"] = "log",
        command_prefix: list[str] | None = None,
    ) -> None:
        if not benchmarks:
            raise UserError("EvaluationCallback needs at least one benchmark")
        if on_failure not in ("log", "raise"):
            raise UserError(f"EvaluationCallback: on_failure must be 'log' or 'raise', got {on_failure!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise UserError(f"EvaluationCallback: timeout_s must be > 0, got {timeout_s}")
        prefix = list(command_prefix or [])
        if any(not isinstance(word, str) or not word for word in prefix):
            raise UserError(f"EvaluationCallback: command_prefix must be non-empty strings, got {command_prefix!r}")
        self.benchmarks = [BenchmarkSpec.of(b) for b in benchmarks]
        for spec in self.benchmarks:  # a wrong class path or argument fails now, not in the first evaluation
            spec.arguments()
            try:
                json.dumps(spec.to_config())
            except (TypeError, ValueError) as e:
                raise UserError(f"EvaluationCallback: benchmark {spec.label!r}: init_args must be plain values "
                                f"(YAML/JSON data) to reach the evaluation process: {e}") from None
        self.every_n_steps = every_n_steps
        self.before_training, self.at_end = before_training, at_end
        self.engine, self.sampling = engine or EngineSpec(), sampling or Sampling()
        self.dirpath, self.keep_weights, self.timeout_s = dirpath, keep_weights, timeout_s
        self.shard_across_ranks, self.on_failure, self.command_prefix = shard_across_ranks, on_failure, prefix
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "eval"

    def _resolve(self, trainer: L.Trainer) -> list[BenchmarkSpec]:
        specs = []
        for spec in self.benchmarks:
            _, args = spec.target()
            named = args.get("source")
            if named in ("data:val", "data:test"):
                attribute = named.split(":")[1]
                source = getattr(trainer.datamodule, attribute, None) if trainer.datamodule else None
                if not source:
                    raise UserError(f"benchmark {spec.label!r}: source {named}, but the data module has no "
                                    f"{attribute} file")
                spec = replace(spec, source=None, init_args={**spec.init_args, "source": str(source)})
            specs.append(spec)
        return specs

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float] | None:
        """Export, evaluate in child processes, agree on the outcome across ranks, log. Returns what is logged
        (``eval/failed`` included; ``{"eval/failed": 1.0}`` after a failure) on rank zero, and on every rank when
        sharded or failed; ``None`` on the other ranks."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        folder = self._root(trainer) / f"step-{step}"
        weights = folder / "model"
        benchmarks = self._resolve(trainer)  # on every rank, before anything starts: a bad source fails everywhere
        module.export_hf(weights)
        trainer.strategy.barrier("evaluation-export")
        sharded = self.shard_across_ranks and trainer.world_size > 1
        rank, world = trainer.global_rank, trainer.world_size
        out = folder / f"rank-{rank}" if sharded else folder
        child = None
        try:
            if sharded or trainer.is_global_zero:
                child = self._start_child(benchmarks, weights, out, step, shard=(rank, world) if sharded else None,
                                          device=trainer.strategy.root_device,
                                          model_name=getattr(module, "pretrained", None))
            states = self._wait(trainer, child)
        finally:
            if child is not None:
                child.stop()  # no-op once it has ended; on an interrupt nothing of it may survive
        failed = {r: state for r, state in enumerate(states) if state in (FAILED, TIMED_OUT)}
        metrics = None
        if not failed:
            if sharded:
                combined = self._sum_across_ranks(child.summary["totals"], trainer)
                metrics = metrics_from_totals(combined)
            elif trainer.is_global_zero:
                metrics = child.summary["metrics"]
        if trainer.is_global_zero and not self.keep_weights:
            shutil.rmtree(weights, ignore_errors=True)
        if failed:
            message = self._failure_message(step, folder, sharded, failed, child if rank in failed else None, rank)
            if self.on_failure == "raise":
                raise EvaluationFailed(message)
            if rank in failed:  # this rank's own child: the end of its log too
                log_tail = f"\n--- {child.log_path} (tail) ---\n{child.tail()}"
                if rank == 0:
                    rank_zero_warn(f"{message}; training goes on{log_tail}")
                else:
                    print(f"[dft_lightning] rank {rank}: {message}{log_tail}", file=sys.stderr, flush=True)
            else:
                rank_zero_warn(f"{message}; training goes on")
            metrics = {}
        if metrics is None:  # another rank's evaluation, successful
            return None
        logged = {**metrics, "eval/failed": 1.0 if failed else 0.0}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
            if not failed:
                self.history.append((step, metrics))
                if sharded:
                    combined_summary = {"step": step, "shards": world, "metrics": metrics, "totals": combined}
                    (folder / "summary.json").write_text(json.dumps(combined_summary, indent=2))
                rank_zero_info(f"[dft_lightning] evaluation at step {step}:\n{format_table(metrics)}")
        return logged

    @staticmethod
    def _failure_message(step: int, folder: Path, sharded: bool, failed: dict[int, int], own: _Child | None,
                         rank: int) -> str:
        """One line naming each failed rank, why (this rank's own reason in full) and its log."""
        parts = []
        for r in sorted(failed):
            why = own.reason if r == rank and own is not None else ("timed out" if failed[r] == TIMED_OUT else "failed")
            log = (folder / f"rank-{r}" if sharded else folder) / "evaluate.log"
            parts.append(f"on rank {r} ({why}; log {log})")
        return f"evaluation at step {step} failed " + ", ".join(parts)

    def _wait(self, trainer: L.Trainer, child: _Child | None) -> list[int]:
        """Poll until no rank's child is running; every rank gets every rank's final state. Each round is one
        all-reduce that all ranks enter within ``poll_s``, so no collective waits on a running evaluation. Rank
        zero relays its child's progress meanwhile (``_relay``)."""
        relayed: dict[str, Any] = {"at": time.monotonic(), "line": None}
        if trainer.world_size == 1:
            while child is not None and child.poll() == RUNNING:
                self._relay(trainer, child, relayed)
                time.sleep(self.poll_s)
            return [DONE if child is None else child.state]
        while True:
            states = torch.zeros(trainer.world_size, dtype=torch.int64, device=trainer.strategy.root_device)
            states[trainer.global_rank] = DONE if child is None else child.poll()
            states = trainer.strategy.reduce(states, reduce_op="sum").tolist()
            if RUNNING not in states:
                return states
            if child is not None and trainer.is_global_zero:
                self._relay(trainer, child, relayed)
            time.sleep(self.poll_s)

    @staticmethod
    def _relay(trainer: L.Trainer, child: _Child, relayed: dict[str, Any]) -> None:
        """Print the child's newest progress line (problems generated, completions graded, rate, ETA), at most
        every ``DFT_LIGHTNING_PROGRESS_EVERY_S`` seconds and only when it changed: plain lines, terminal or not."""
        now = time.monotonic()
        if now - relayed["at"] < default_every_s():
            return
        line = child.progress_line()
        if line and line != relayed["line"]:
            relayed["at"], relayed["line"] = now, line
            print(f"[dft_lightning] evaluation at step {trainer.global_step}: {line}", flush=True)

    @staticmethod
    def _sum_across_ranks(totals: dict[str, dict[str, float]], trainer: L.Trainer) -> dict:
        """Add each rank's per-benchmark sums (one all-reduce; every rank has the same benchmarks)."""
        names = sorted(totals)
        local = torch.tensor([float(totals[name][key]) for name in names for key in SUMMED], dtype=torch.float64,
                             device=trainer.strategy.root_device)
        summed = iter(trainer.strategy.reduce(local, reduce_op="sum").tolist())
        return {name: {"k": totals[name]["k"], **{key: next(summed) for key in SUMMED}} for name in names}

    def _start_child(
        self, benchmarks: list[BenchmarkSpec], weights: Path, folder: Path, step: int,
        shard: tuple[int, int] | None = None, device=None, model_name: str | None = None,
    ) -> _Child:
        """Start ``[prefix...] python -m dft_lightning evaluate`` on ``weights``, writing into ``folder``."""
        config = {
            "model": str(weights), "benchmarks": [b.to_config() for b in benchmarks],
            "model_name": str(model_name) if model_name else None,
            "engine": asdict(self.engine), "sampling": asdict(self.sampling), "output_dir": str(folder), "step": step,
            "shard": list(shard) if shard else None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").unlink(missing_ok=True)  # from an earlier run into the same folder
        config_path = folder / "evaluate.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        if device is not None and getattr(device, "type", "cpu") == "cuda":  # this rank's GPU only
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(device.index + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ids[device.index]
        command = [*self.command_prefix, sys.executable, "-m", "dft_lightning", "evaluate", "--config",
                   str(config_path)]
        return _Child(command, env, folder / "evaluate.log", folder / "summary.json", self.timeout_s)

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
