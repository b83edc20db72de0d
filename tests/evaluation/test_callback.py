"""EvaluationCallback's waiting and failure handling: its child process on its own, then whole training runs (one
process, and two gloo ranks whose collectives time out after 5 s while evaluations take longer)."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from dft_lightning.errors import UserError
from dft_lightning.evaluation.callback import DONE, FAILED, RUNNING, TIMED_OUT, EvaluationCallback, _Child
from dft_lightning.evaluation.run import BenchmarkSpec
from tests.conftest import REPO, read_metrics, run_cli


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait(child: _Child, limit_s: float = 30.0) -> int:
    deadline = time.monotonic() + limit_s
    while child.poll() == RUNNING:
        assert time.monotonic() < deadline, "the child should have ended"
        time.sleep(0.05)
    return child.state


def _child(tmp_path, code: str, timeout_s: float | None = None) -> _Child:
    return _Child([sys.executable, "-c", code], {}, tmp_path / "evaluate.log", tmp_path / "summary.json", timeout_s)


def test_child_states_from_exit_status_and_summary(tmp_path):
    failed = _child(tmp_path, "import sys; print('no such benchmark'); sys.exit(3)")
    assert _wait(failed) == FAILED and failed.reason == "exit status 3" and "no such benchmark" in failed.tail()
    silent = _child(tmp_path, "pass")  # exit 0 but nothing written
    assert _wait(silent) == FAILED and "no readable summary.json" in silent.reason
    summary = str(tmp_path / "summary.json")
    done = _child(tmp_path, f"import json; open({summary!r}, 'w').write(json.dumps({{'metrics': {{'m': 1}}}}))")
    assert _wait(done) == DONE and done.summary == {"metrics": {"m": 1}}
    # the kernel's out-of-memory killer ends a process with SIGKILL, without a word in its log
    killed = _child(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert _wait(killed) == FAILED and killed.reason == "killed by SIGKILL (often the kernel's out-of-memory killer)"
    missing = _Child(["/no/such/wrapper", "x"], {}, tmp_path / "e.log", tmp_path / "summary.json", None)
    assert missing.poll() == FAILED and "cannot start '/no/such/wrapper'" in missing.reason


def test_child_over_its_time_limit_is_stopped_with_its_helpers(tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
            "print(p.pid, flush=True); time.sleep(300)")
    child = _child(tmp_path, code, timeout_s=1.5)
    started = time.monotonic()
    assert _wait(child) == TIMED_OUT and child.reason == "timed out after 1.5 s"
    assert time.monotonic() - started < 10, "SIGINT ends a Python child at once"
    helper = int((tmp_path / "evaluate.log").read_text().split()[0])
    assert not _alive(helper) and not _alive(child.proc.pid)


def test_bad_settings_are_clear_errors():
    bench = [BenchmarkSpec("b", "math500", "x.jsonl")]
    with pytest.raises(UserError, match="on_failure must be 'log' or 'raise'"):
        EvaluationCallback(bench, on_failure="ignore")
    with pytest.raises(UserError, match="timeout_s must be > 0"):
        EvaluationCallback(bench, timeout_s=0)
    with pytest.raises(UserError, match="command_prefix must be non-empty strings"):
        EvaluationCallback(bench, command_prefix=["nice", ""])


def _fit(tmp_path, callbacks: str, *extra: str, timeout: int = 600):
    (tmp_path / "eval.yaml").write_text(f"trainer:\n  callbacks:\n{callbacks}")
    return run_cli(["fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--config", str(tmp_path / "eval.yaml"),
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0",
                    f"--data.init_args.data_dir={tmp_path / 'data'}", *extra], cwd=tmp_path, timeout=timeout)


def test_a_failed_evaluation_can_stop_the_run_with_one_line(tmp_path):
    result = _fit(tmp_path, f"""
    - class_path: dft_lightning.evaluation.callback.EvaluationCallback
      init_args:
        benchmarks: [{{name: gone, kind: math500, source: "{tmp_path / 'missing.jsonl'}"}}]
        before_training: true
        on_failure: raise
        engine: {{kind: hf}}
        sampling: {{n: 1, temperature: 0.0, max_tokens: 4}}
""", "--trainer.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    log = next(tmp_path.rglob("eval/step-0/evaluate.log"))
    assert len(errors) == 1 and re.fullmatch(rf"error: evaluation at step 0 failed on rank 0 \(exit status [12]; "
                                             rf"log {re.escape(str(log))}\)", errors[0]), result.stderr[-3000:]
    assert "missing.jsonl" in log.read_text()  # the child's own error, for real


@pytest.mark.slow
def test_two_ranks_outlast_the_collective_timeout_and_agree_on_a_failure(tmp_path):
    """Rank 0's evaluation (it alone evaluates) sleeps past the 5 s collective timeout; then, sharded, rank 1's
    evaluation fails at step 0: both ranks log it as failed and train on, and the end evaluation sums the shares."""
    whole = tmp_path / "eval-whole"
    result = _fit(tmp_path, f"""
    - class_path: dft_lightning.evaluation.callback.EvaluationCallback
      init_args:
        benchmarks: [{{name: whole, kind: math500, source: "data:val", limit: 2}}]
        before_training: true
        at_end: false
        dirpath: {whole}
        command_prefix: [sh, -c, 'sleep 6; exec "$@"', sh]
        engine: {{kind: hf, batch_size: 4}}
        sampling: {{n: 1, temperature: 0.0, max_tokens: 4}}
    - class_path: dft_lightning.evaluation.callback.EvaluationCallback
      init_args:
        benchmarks: [{{name: held_out, kind: math500, source: "data:val", limit: 3}}]
        before_training: true
        shard_across_ranks: true
        command_prefix: [sh, -c, 'case "$*" in *step-0/rank-1*) echo "rank 1 is out" >&2; exit 3;; esac; exec "$@"',
                         sh]
        engine: {{kind: hf, batch_size: 4}}
        sampling: {{n: 1, temperature: 0.0, max_tokens: 4}}
  strategy:
    class_path: tests.evaluation.short_timeout.ShortTimeoutDDP
    init_args: {{collective_timeout_s: 5}}
""", "--trainer.max_steps=1", "--trainer.devices=2", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_metrics(tmp_path)
    logged = [(int(r["step"]), r.get("eval/whole/avg@1", ""), r.get("eval/held_out/avg@1", ""), r["eval/failed"])
              for r in rows if r.get("eval/failed")]
    assert [(step, bool(w), bool(h), float(f)) for step, w, h, f in logged] == [
        (0, True, False, 0.0),  # rank 0's long evaluation
        (0, False, False, 1.0),  # rank 1's shard failed: one failed evaluation, logged once
        (1, False, True, 0.0),  # the end evaluation, summed over both shards
    ]
    assert json.loads((whole / "step-0" / "summary.json").read_text())["totals"]["whole"]["problems"] == 2
    step0 = next(p for p in tmp_path.rglob("step-0") if p.parent.name == "eval")
    log = step0 / "rank-1" / "evaluate.log"
    assert "rank 1 is out" in log.read_text()
    assert f"evaluation at step 0 failed on rank 1 (failed; log {log}); training goes on" in result.stderr
    assert f"[dft_lightning] rank 1: evaluation at step 0 failed on rank 1 (exit status 3; log {log})" in result.stderr
    step1 = step0.parent / "step-1"
    shares = [json.loads((step1 / f"rank-{r}" / "summary.json").read_text())["totals"]["held_out"]["problems"]
              for r in (0, 1)]
    assert shares == [2, 1]
    combined = json.loads((step1 / "summary.json").read_text())
    assert combined["totals"]["held_out"]["problems"] == 3 and "eval/held_out/avg@1" in combined["metrics"]
