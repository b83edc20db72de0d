"""Attacks on the sandbox, one property per test, each with a bound on how long the evaluator took.

Tests that rely on the privilege drop (the program cannot touch the caller's files or signal the caller)
run only as root; as a normal user the sandbox does not claim those properties (see docs/sandbox.md).
The fork and memory bombs refuse to start unless the limits that contain them are in place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dft_lightning.evaluation.sandbox import Limits, run_command, run_program, sandbox_python

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="without root the program runs as the caller's own uid")
SLACK_S = 4.0  # what the evaluator may take beyond the program's own limit (start-up, kill, sweep)
REPO = Path(__file__).resolve().parents[2]


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def live_pids_with(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (zombies have an empty command line)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmdline:
                pids.append(int(name))
    return pids


@pytest.fixture(scope="module", autouse=True)
def dropped_privileges():
    """Every attack below assumes that, as root, programs run under another uid: check that first."""
    result = run_program("import os; print(os.getuid(), os.getgid(), os.getgroups())", timeout_s=30)
    assert result.ok, result
    uid, gid, groups = result.stdout.split(maxsplit=2)
    if IS_ROOT:
        assert int(uid) != 0 and int(gid) != 0 and groups.strip() == "[]", result.stdout
    else:
        assert int(uid) == os.getuid()


def test_program_runs_in_a_fresh_directory_that_is_removed():
    result, took = timed(run_program, "import os; print(os.getcwd()); open('f.txt', 'w').write('x')", timeout_s=10)
    assert result.ok and result.returncode == 0, result
    cwd = Path(result.stdout.strip())
    assert cwd != Path.cwd() and not cwd.exists()
    assert took < 10 + SLACK_S


@pytest.mark.parametrize("body", ["while True:\n    pass", "import time\ntime.sleep(1000)"], ids=["busy", "sleep"])
def test_infinite_loop_times_out(body):
    result, took = timed(run_program, body, timeout_s=1.5)
    assert result.status == "timeout", result
    assert 1.5 <= took < 1.5 + SLACK_S


FORK_BOMB = """
import os, sys
if os.getuid() == 0:
    sys.exit("refusing to fork bomb as root: RLIMIT_NPROC would not apply")
if "{marker}" not in sys.argv:  # re-exec so every process carries the marker on its command line
    os.execv(sys.executable, [sys.executable, "-c", open(__file__).read(), "{marker}"])
hit = False
while True:
    try:
        os.fork()
    except OSError:
        if not hit:
            hit = True
            print("process limit hit", flush=True)
"""


def test_fork_bomb_is_contained():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    result, took = timed(run_program, FORK_BOMB.format(marker=marker), timeout_s=3, max_processes=8)
    assert result.status == "timeout", result
    assert "process limit hit" in result.stdout, result  # forks did fail: the limit, not luck, held it
    assert took < 3 + SLACK_S
    assert live_pids_with(marker) == []
    after = run_program("print('still works')", timeout_s=10)  # the evaluator survives and can go on
    assert after.ok and after.stdout.strip() == "still works"


def test_fork_bomb_does_not_starve_concurrent_runs():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    results: dict[str, object] = {}
    bomb = threading.Thread(
        target=lambda: results.update(bomb=run_program(FORK_BOMB.format(marker=marker), timeout_s=3)), daemon=True
    )
    bomb.start()
    time.sleep(0.5)
    start = time.monotonic()
    others = [run_program(f"import os; print({i} * 2)", timeout_s=10) for i in range(4)]
    bomb.join(timeout=3 + 2 * SLACK_S)
    assert not bomb.is_alive()
    assert [r.stdout.strip() for r in others] == ["0", "2", "4", "6"], others
    assert results["bomb"].status == "timeout"
    assert time.monotonic() - start < 3 + 2 * SLACK_S
    assert live_pids_with(marker) == []


MEMORY_BOMB = """
import resource, sys
if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
    sys.exit("refusing to allocate without an address-space limit")
chunks = []
while True:
    chunks.append(b"x" * (32 << 20))  # touched memory, not just reserved
"""


def test_memory_bomb_is_stopped():
    result, took = timed(run_program, MEMORY_BOMB, timeout_s=10, memory_mb=256)
    assert result.status in ("failed", "killed"), result
    if result.status == "failed":
        assert "MemoryError" in result.stderr, result
    assert took < 10 + SLACK_S


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_and_returns_promptly(stream):
    cap = 64 * 1024
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n"
    result, took = timed(run_program, code, timeout_s=30, max_output_bytes=cap)
    assert result.status == "killed" and result.output_truncated, result.reason
    assert len(getattr(result, stream).encode()) <= cap
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= cap
    assert took < 5.0  # killed at the cap, long before the 30 s wall limit


WRITER = """
import json, os
out = {{}}
def attempt(name, fn):
    try:
        fn()
        out[name] = "succeeded"
    except OSError as exc:
        out[name] = type(exc).__name__
attempt("overwrite_tmp_file", lambda: open({tmp_file!r}, "w").write("pwned"))
attempt("append_tmp_file", lambda: open({tmp_file!r}, "a").write("pwned"))
attempt("unlink_tmp_file", lambda: os.unlink({tmp_file!r}))
attempt("overwrite_test_file", lambda: open({test_file!r}, "w").write("pwned"))
attempt("create_in_test_dir", lambda: open({new_file!r}, "w").write("pwned"))
attempt("create_beside_workdir", lambda: open("../escape.txt", "w").write("pwned"))
print(json.dumps(out))
"""


@needs_root
def test_cannot_write_outside_its_directory(tmp_path):
    tmp_file = Path("/tmp") / f"dft-sandbox-test-{uuid.uuid4().hex}"
    tmp_file.write_text("original")
    tmp_file.chmod(0o644)  # world-readable, as most of the caller's files are
    test_file = tmp_path / "results.txt"
    test_file.write_text("original")
    new_file = tmp_path / "planted.txt"
    try:
        code = WRITER.format(tmp_file=str(tmp_file), test_file=str(test_file), new_file=str(new_file))
        result, took = timed(run_program, code, timeout_s=10)
        assert result.ok, result
        attempts = json.loads(result.stdout)
        assert all(outcome != "succeeded" for outcome in attempts.values()), attempts
        assert tmp_file.read_text() == "original" and test_file.read_text() == "original"
        assert not new_file.exists()
        assert took < 10 + SLACK_S
    finally:
        tmp_file.unlink(missing_ok=True)


ENV_READER = """
import json, os
try:
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        parent = f.read().decode(errors="replace")
except OSError as exc:
    parent = type(exc).__name__
print(json.dumps({"env": dict(os.environ), "parent_environ": parent}))
"""

EVALUATOR = """
import json, sys
from dft_lightning.evaluation.sandbox import run_program
r = run_program(sys.argv[1], timeout_s=10)
print(json.dumps({"status": r.status, "stdout": r.stdout, "stderr": r.stderr}))
"""


def test_parent_environment_is_not_visible(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("DFT_SECRET", secret)
    # An evaluator process whose *initial* environment holds the secret, so /proc/<ppid>/environ has it too.
    evaluator, took = timed(
        subprocess.run,
        [sys.executable, "-c", EVALUATOR, ENV_READER],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert evaluator.returncode == 0, evaluator.stderr
    run = json.loads(evaluator.stdout)
    assert run["status"] == "ok", run
    seen = json.loads(run["stdout"])
    assert secret not in run["stdout"] and secret not in run["stderr"]
    assert "DFT_SECRET" not in seen["env"]
    assert set(seen["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "DFT_SANDBOX_RUN", "LC_CTYPE"}
    if IS_ROOT:
        assert seen["parent_environ"] == "PermissionError", seen["parent_environ"][:200]
    assert took < 10 + 2 * SLACK_S


KILLER = """
import json, os, signal
parent = os.getppid()
out = {"parent": parent}
for name, fn in [("kill_parent", lambda: os.kill(parent, signal.SIGKILL)),
                 ("killpg_parent", lambda: os.killpg(os.getpgid(parent), signal.SIGKILL))]:
    try:
        fn()
        out[name] = "succeeded"
    except OSError as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


@needs_root
def test_cannot_kill_the_parent():
    result, took = timed(run_program, KILLER, timeout_s=10)
    # Reaching this line at all means this test process survived SIGKILL aimed at it and at its group.
    assert result.ok, result
    out = json.loads(result.stdout)
    assert out["parent"] == os.getpid()
    assert out["kill_parent"] == "PermissionError" and out["killpg_parent"] == "PermissionError", out
    assert took < 10 + SLACK_S


def test_program_gets_its_own_session():
    code = "import os; print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())"
    result, took = timed(run_program, code, timeout_s=10)
    assert result.ok and result.stdout.split() == ["True", "True"], result
    assert took < 10 + SLACK_S


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # leave the program's session and process group
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
    os._exit(0)
time.sleep(0.5)
print("parent done")
"""


def test_processes_that_escape_the_group_are_killed():
    marker = f"daemon-{uuid.uuid4().hex}"
    result, took = timed(run_program, DAEMON.format(marker=marker), timeout_s=10)
    assert result.ok and "parent done" in result.stdout, result
    assert live_pids_with(marker) == []
    assert took < 10 + SLACK_S


@pytest.mark.parametrize("ignore_sigxcpu", [False, True], ids=["plain", "ignores-SIGXCPU"])
def test_cpu_time_limit_holds_without_the_wall_clock(ignore_sigxcpu):
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n" if ignore_sigxcpu else ""
    code += "while True:\n    pass\n"
    limits = Limits(timeout_s=30, cpu_time_s=1)
    result, took = timed(run_command, [sandbox_python(), "main.py"], files={"main.py": code}, limits=limits)
    if ignore_sigxcpu:  # the hard limit, one second later, is SIGKILL
        assert result.status == "killed" and result.returncode == -signal.SIGKILL, result
    else:
        assert result.status == "timeout" and result.returncode == -signal.SIGXCPU, result
    assert took < 2 + SLACK_S  # the CPU limit fired, long before the 30 s wall limit


def test_unstartable_program_is_an_error_not_a_crash():
    result, took = timed(run_command, ["/nonexistent/interpreter", "main.py"], files={"main.py": "print(1)"})
    assert result.status == "error" and "nonexistent" in result.reason, result
    missing = run_command(["no-such-command-anywhere"])
    assert missing.status == "error"
    assert took < SLACK_S
