"""Run untrusted programs (model-generated code) in a child process with limits, and report what happened.

What it does, for every run:

* a fresh temporary directory as the working directory (also ``HOME`` and ``TMPDIR``), removed afterwards;
* a scrubbed environment (``PATH``, ``LANG``/``LC_ALL``, ``HOME``, ``TMPDIR``, a per-run marker), nothing
  inherited from the caller; stdin from ``/dev/null`` or from given bytes;
* a new session and process group;
* ``setrlimit`` in the child before the program starts: CPU seconds, address space, file size, open files,
  processes (threads count too), no core files; and ``PR_SET_NO_NEW_PRIVS``, so set-uid binaries gain nothing;
* when the caller is root: the program runs under an unprivileged uid/gid leased for this run alone, from
  ``SANDBOX_UIDS`` (ids no account, group or live process uses; the lease is an abstract unix socket, so
  concurrent runs, threads or evaluator processes never share one). Only then does ``RLIMIT_NPROC`` hold
  fork bombs (it does not apply to root), and only then can the program neither signal the caller nor
  touch the caller's files;
* a wall-clock limit, and an output cap: stdout and stderr are read as they arrive and the run is killed
  once their total passes the cap;
* at the end the process group is killed, then every straggler: as root, every process of the leased uid
  (``kill(-1)`` sent under that uid, which also catches processes that left the group); as a normal user,
  the caller's processes whose environment still carries the run's marker.

What it does not do: network isolation; filesystem isolation beyond permissions (the program can read what
is world-readable and write what is world-writable, e.g. new files in ``/tmp``); a memory limit across
processes (the bound is ``max_processes * memory_mb``); protection from kernel exploits. Without root the
program runs as the caller's user and can signal the caller and read or write its files. This is not a
security boundary by itself: see ``docs/sandbox.md``, and use a container or VM for hostile code.

``run_command`` runs any argv (``node``, ``sh -c "g++ main.cpp && ./a.out"``) over files written into the
working directory; ``run_program`` runs Python source with an interpreter the sandbox user can execute.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import math
import os
import pwd
import random
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SANDBOX_PATH",
    "SANDBOX_UIDS",
    "ExecutionResult",
    "Limits",
    "SandboxError",
    "run_command",
    "run_program",
    "sandbox_python",
]

logger = logging.getLogger(__name__)

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UIDS = range(65000, 65500)  # unprivileged ids, one leased per run when the caller is root
_MARKER_VAR = "DFT_SANDBOX_RUN"

# Trusted code run in the child (as the caller) before the program: limits, privilege drop, then exec().
# Started with -I -S, and it imports everything before dropping privileges (the caller's stdlib may be
# unreadable to the sandbox uid). Errors go back through the status pipe, which closes on a successful exec.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
fd = cfg["status_fd"]
try:
    os.set_inheritable(fd, False)
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if 0 in os.getresuid() or 0 in os.getresgid() or os.getgroups():
            raise PermissionError("privileges were not dropped")
    if cfg["reap"]:
        try:
            os.kill(-1, 9)
        except ProcessLookupError:
            pass
        os._exit(0)
    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)
    os.execv(cfg["argv"][0], cfg["argv"])
except BaseException as exc:
    os.write(fd, f"{type(exc).__name__}: {exc}".encode())
    os._exit(127)
"""


class SandboxError(RuntimeError):
    """The sandbox itself could not run the program (no free uid, no usable interpreter, bad argv)."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``max_processes`` counts threads too; ``cpu_time_s`` defaults to ceil(timeout) + 1."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_processes: int = 8
    max_file_mb: int = 16
    max_open_files: int = 64
    cpu_time_s: int | None = None


@dataclass(frozen=True)
class ExecutionResult:
    """What happened. ``status``: ``ok`` (exit code 0), ``failed`` (non-zero exit: an exception, an assert,
    ``MemoryError``), ``timeout`` (wall-clock or CPU limit), ``killed`` (a signal, or the output cap), or
    ``error`` (the sandbox could not start the program). ``reason`` says which limit or code, in words."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str = ""
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _error(reason: str, started: float) -> ExecutionResult:
    return ExecutionResult("error", None, "", "", time.monotonic() - started, reason)


# ------------------------------------------------------------------------------------------- processes


def _processes() -> Iterator[tuple[int, bytes, tuple[int, ...], int]]:
    """(pid, state, (real, effective, saved, fs uid), threads) for every process in /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            uids = tuple(map(int, fields[b"Uid"].split()))
            yield int(name), fields[b"State"].split()[0], uids, int(fields[b"Threads"])
        except (OSError, KeyError, ValueError, IndexError):
            continue


def _live_pids_of_uid(uid: int) -> list[int]:
    return [pid for pid, state, uids, _ in _processes() if uid in uids and state not in (b"Z", b"X")]


def _spawn_launcher(cfg: dict, **popen_kwargs) -> tuple[subprocess.Popen, str]:
    """Start the launcher; return the process and the launcher's error message ("" once the program exec'd)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps({**cfg, "status_fd": write_fd})],
            pass_fds=(write_fd,),
            start_new_session=True,
            **popen_kwargs,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    message = b""
    with open(read_fd, "rb", buffering=0) as status, selectors.DefaultSelector() as sel:
        sel.register(status, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=60.0):
                message += b"launcher did not start within 60 s"
                break
            chunk = status.read(4096)
            if not chunk:
                break
            message += chunk
    return proc, message.decode(errors="replace")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (caller is root), with ``kill(-1)`` sent under that uid."""
    devnull = subprocess.DEVNULL
    for attempt in range(40):
        if not _live_pids_of_uid(uid):
            return
        time.sleep(min(0.01 * attempt, 0.2))
        cfg = {"rlimits": {}, "uid": uid, "reap": True, "argv": []}
        reaper, err = _spawn_launcher(cfg, stdin=devnull, stdout=devnull, stderr=devnull)
        reaper.wait(timeout=30)
        if err:
            logger.warning("sandbox reaper for uid %d failed: %s", uid, err)
    logger.warning("sandbox: processes of uid %d survived SIGKILL: %s", uid, _live_pids_of_uid(uid))


def _kill_marked(marker: str) -> None:
    """SIGKILL the caller's own processes whose environment carries ``marker`` (the sweep without root)."""
    needle, me, my_pid = f"{_MARKER_VAR}={marker}\0".encode(), os.getuid(), os.getpid()
    for _ in range(40):
        found = 0
        for pid, state, uids, _ in _processes():
            if pid == my_pid or state in (b"Z", b"X") or uids[0] != me:
                continue
            with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read():
                    os.kill(pid, signal.SIGKILL)
                    found += 1
        if not found:
            return
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ identities


@functools.lru_cache(maxsize=1)
def _usable_ids() -> frozenset[int]:
    """Pool ids this (possibly user-namespaced) process can switch to, and that no account or group uses."""
    usable = set(SANDBOX_UIDS)
    for path in ("/proc/self/uid_map", "/proc/self/gid_map"):
        with contextlib.suppress(OSError), open(path) as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
            usable = {i for i in usable if any(lo <= i < lo + n for lo, _, n in ranges)}
    for lookup in (pwd.getpwuid, grp.getgrgid):
        for i in list(usable):
            with contextlib.suppress(KeyError):
                lookup(i)
                usable.discard(i)
    return frozenset(usable)


@contextlib.contextmanager
def _leased_uid() -> Iterator[int | None]:
    """A uid for this run alone when the caller is root (``None`` otherwise); held until the block ends."""
    if os.geteuid() != 0:
        yield None
        return
    busy = {uid for _, _, uids, _ in _processes() for uid in uids}
    free = sorted(_usable_ids() - busy)
    if not free:
        raise SandboxError(f"no free sandbox uid in {SANDBOX_UIDS} (used by accounts, groups or processes)")
    start = random.randrange(len(free))
    for uid in free[start:] + free[:start]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lock:
            try:
                lock.bind(f"\0dft-lightning-sandbox-uid-{uid}")
            except OSError:
                continue
            yield uid
            return
    raise SandboxError(f"every free sandbox uid in {SANDBOX_UIDS} is leased by another run")


@contextlib.contextmanager
def _workspace(uid: int | None) -> Iterator[tuple[Path, Path]]:
    """(private base, working dir): the base (not writable by the program) also holds the stdin file."""
    base = Path(tempfile.mkdtemp(prefix="dft-sandbox-"))
    try:
        work = base / "work"
        work.mkdir(mode=0o700)
        if uid is not None:
            os.chmod(base, 0o711)
            os.chown(work, uid, uid)
        yield base, work
    finally:

        def make_writable(func, target, _exc) -> None:  # a same-uid program may have chmod'ed things to 000
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(target), 0o700)
                func(target)

        shutil.rmtree(base, onerror=make_writable)
        if base.exists():
            logger.warning("sandbox: could not remove %s", base)


# ------------------------------------------------------------------------------------------------- runs


def _rlimits(limits: Limits, uid: int | None) -> dict[str, tuple[int, int]]:
    cpu = limits.cpu_time_s or math.ceil(limits.timeout_s) + 1
    nproc = limits.max_processes
    if uid is None:  # the caller's own uid: its existing tasks count against the limit as well
        nproc += sum(threads for _, _, uids, threads in _processes() if uids[0] == os.getuid())
    wanted = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (limits.memory_mb << 20,) * 2,
        "RLIMIT_FSIZE": (limits.max_file_mb << 20,) * 2,
        "RLIMIT_NOFILE": (limits.max_open_files,) * 2,
        "RLIMIT_NPROC": (nproc,) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    clamped = {}
    for name, (soft, hard) in wanted.items():  # never above the caller's own hard limit (no raising needed)
        cap = resource.getrlimit(getattr(resource, name))[1]
        clamped[name] = (soft, hard) if cap == resource.RLIM_INFINITY else (min(soft, cap), min(hard, cap))
    return clamped


def _status(returncode: int, timed_out: bool, truncated: bool, limits: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall time limit of {limits.timeout_s:g} s"
    if truncated:
        return "killed", f"output passed {limits.max_output_bytes} bytes"
    if returncode >= 0:
        return ("ok", "") if returncode == 0 else ("failed", f"exit code {returncode}")
    if -returncode == signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if -returncode == signal.SIGXFSZ:
        return "killed", "file size limit"
    try:
        return "killed", f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return "killed", f"killed by signal {-returncode}"


def _collect(proc: subprocess.Popen, limits: Limits, cleanup: Callable[[], None]) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close, the wall limit, or the cap: (stdout, stderr, timed_out, truncated)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    deadline = time.monotonic() + limits.timeout_s
    total, timed_out, truncated, cleaned = 0, False, False, False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = proc.poll() is None
                break
            if not sel.get_map():  # both streams closed: wait for the exit
                try:
                    proc.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    timed_out = True
                break
            if not cleaned and proc.poll() is not None:
                cleanup()  # the program is done: leftovers still holding the pipes go now
                cleaned = True
            for key, _ in sel.select(timeout=min(remaining, 0.1)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                room = limits.max_output_bytes - total
                bufs[key.fd] += chunk[:room]
                total += min(room, len(chunk))
                truncated = truncated or len(chunk) > room
    out, err = bufs.values()
    return bytes(out), bytes(err), timed_out, truncated


def run_command(
    argv: Sequence[str],
    *,
    files: Mapping[str, str | bytes] | None = None,
    limits: Limits | None = None,
    stdin: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> ExecutionResult:
    """Run ``argv`` in a fresh sandbox whose working directory holds ``files`` (plain file names).

    ``argv[0]`` is looked up on ``SANDBOX_PATH`` unless it contains a ``/``; the sandbox user must be able to
    execute it. ``env`` adds variables to the scrubbed environment. A misbehaving program never raises here;
    sandbox failures come back as ``status == "error"``.
    """
    limits = limits or Limits()
    started = time.monotonic()
    if not argv:
        return _error("empty argv", started)
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=SANDBOX_PATH)
    if exe is None:
        return _error(f"{argv[0]!r} not found on {SANDBOX_PATH}", started)
    for name in files or {}:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            return _error(f"file names must be plain names inside the working directory, got {name!r}", started)
    try:
        with _leased_uid() as uid, _workspace(uid) as (base, work), contextlib.ExitStack() as stack:
            for name, content in (files or {}).items():
                (work / name).write_bytes(content.encode() if isinstance(content, str) else content)
            stdin_file = subprocess.DEVNULL
            if stdin is not None:
                (base / "stdin").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
                stdin_file = stack.enter_context(open(base / "stdin", "rb"))
            marker = secrets.token_hex(16)
            env = {**(env or {}), "PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            env.update(HOME=str(work), TMPDIR=str(work), **{_MARKER_VAR: marker})
            cfg = {"rlimits": _rlimits(limits, uid), "uid": uid, "reap": False, "argv": [exe, *argv[1:]]}
            proc, launch_error = _spawn_launcher(
                cfg, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=env
            )

            def cleanup() -> None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if uid is not None:
                    _kill_uid(uid)
                else:
                    _kill_marked(marker)

            with proc:
                try:
                    out, err, timed_out, truncated = b"", b"", False, False
                    if not launch_error:
                        out, err, timed_out, truncated = _collect(proc, limits, cleanup)
                finally:
                    cleanup()
                    proc.wait()
    except SandboxError as exc:
        return _error(str(exc), started)
    duration = time.monotonic() - started
    if launch_error:
        return ExecutionResult("error", None, "", "", duration, f"could not start {exe}: {launch_error}")
    status, reason = _status(proc.returncode, timed_out, truncated, limits)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    return ExecutionResult(status, proc.returncode, stdout, stderr, duration, reason, truncated)


# ----------------------------------------------------------------------------------------------- python

_python_lock = threading.Lock()
_python_found: list[str] = []


def sandbox_python() -> str:
    """A Python interpreter the sandbox user can run: ``sys.executable`` if it can, else ``python3`` on PATH.

    As root, the caller's interpreter may live where the unprivileged uid cannot reach (``/root/.pyenv``);
    a system interpreter is used then, without the caller's site-packages. Probed once per process.
    """
    with _python_lock:
        if _python_found:
            return _python_found[0]
        candidates = [sys.executable]
        system = shutil.which("python3", path=SANDBOX_PATH)
        if os.geteuid() == 0 and system and os.path.realpath(system) != os.path.realpath(sys.executable):
            candidates.append(system)
        failures = []
        for exe in candidates:
            probe = run_command([exe, "-E", "-s", "-c", "print('ready')"], limits=Limits(timeout_s=60))
            if probe.ok and probe.stdout.strip() == "ready":
                if exe != sys.executable:
                    logger.info("sandbox: %s is not usable by the sandbox uid; using %s", sys.executable, exe)
                _python_found.append(exe)
                return exe
            failures.append(f"{exe}: {probe.status} {probe.reason} {probe.stderr.strip()[-300:]}")
        raise SandboxError("no Python interpreter runs in the sandbox: " + "; ".join(failures))


def run_program(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 8,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    stdin: str | bytes | None = None,
    python: str | None = None,
    filename: str = "main.py",
) -> ExecutionResult:
    """Run Python source ``code`` as ``filename`` in a fresh sandbox (see the module docstring).

    ``python`` picks the interpreter (default: ``sandbox_python()``); it runs with ``-E -s -B``.
    """
    limits = Limits(timeout_s, memory_mb, max_output_bytes, max_processes, max_file_mb, max_open_files)
    try:
        exe = python or sandbox_python()
    except SandboxError as exc:
        return _error(str(exc), time.monotonic())
    return run_command([exe, "-E", "-s", "-B", filename], files={filename: code}, limits=limits, stdin=stdin)
