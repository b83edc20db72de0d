"""Language runners: compile (where needed) and run one program per language in the sandbox.

A ``Runner`` holds what one language needs: the file name the source is written to, the command that compiles
and runs it as *one* sandboxed run (compiled languages go through ``sh -c "compile && exec ./program"``, because
the sandbox's working directory lives for a single run), the tools that must be on the sandbox's ``PATH``, and
its own ``Limits``. Limits are per language because one set does not fit all: a JVM reserves far more address
space than CPython and starts a dozen threads (``RLIMIT_NPROC`` counts threads), and ``g++`` needs a few hundred
MB and several processes just to compile ``<bits/stdc++.h>``.

Languages (MultiPL-E's names; aliases in brackets):

========  ==================================================  ======================================
``py``    ``python3 -E -s -B`` (``sandbox_python()``)          [python]
``js``    ``node``                                             [javascript]
``cpp``   ``g++ -std=c++17`` then the binary                   [c++]
``java``  ``javac`` then ``java -ea`` (class ``Problem``)      needs the javatuples jar when imported
``php``   ``php``
``sh``    ``bash``                                             [bash]
``pl``    ``perl``                                             [perl]; needs Test::Deep when used
========  ==================================================  ======================================

Availability is checked, never assumed. ``check_available(language, source)`` runs a tiny program through the
runner, under the sandbox uid and the runner's limits (so "installed but not executable by the sandbox user" or
"the JVM does not start under these limits" are caught too), caches the answer per process, and raises
``RunnerUnavailable`` naming the missing tool. It also checks what a given source needs beyond the toolchain:
MultiPL-E's Java programs all import ``org.javatuples`` (the jar is looked up in ``$DFT_JAVATUPLES_JAR``, then
``/usr/share/java/javatuples.jar`` from Debian's ``libjavatuples-java``, then MultiPL-E's own
``/usr/multiple/javatuples-1.2.jar``, and copied into the run's directory), and its Perl tests ``use Test::Deep``.

A pass is proven as in ``graders.code``: ``Runner.program`` assembles ``prompt + completion + "\\n" + tests``
(MultiPL-E's layout) and adds a statement that writes a random per-run marker after the last test: appended
at the end for script languages, or before the closing brace of ``main`` for C++ and Java (MultiPL-E's test
suites end with it). ``run_source`` passes a run only when it exits 0 *and* the marker is on stdout, so a
completion that exits early (``exit(0)``, ``System.exit(0)``, ``process.exit(0)``) fails. When the tests do
not have the expected shape the marker cannot be placed; the run is then judged on its exit code alone and
``RunOutcome.proved`` is False.

Not handled: other languages (Ruby's test/unit and Lua's luaunit run their tests at exit, so they would need a
different proof as well as a runner); installing toolchains or libraries; caching compiled programs; and the
sandbox's own limits (see ``sandbox.py``: it is not a security boundary).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dft_lightning.evaluation.sandbox import (
    SANDBOX_PATH,
    ExecutionResult,
    Limits,
    SandboxError,
    run_command,
    sandbox_python,
)

__all__ = [
    "JAVATUPLES_CANDIDATES",
    "LANGUAGE_ALIASES",
    "RUNNERS",
    "RunOutcome",
    "Runner",
    "RunnerUnavailable",
    "available_languages",
    "canonical_language",
    "check_available",
    "find_javatuples_jar",
    "get_runner",
    "run_source",
]

JAVATUPLES_CANDIDATES = ("/usr/share/java/javatuples.jar", "/usr/multiple/javatuples-1.2.jar")
_JAVATUPLES_ENV = "DFT_JAVATUPLES_JAR"
_JAR_NAME = "javatuples.jar"
_COMPILE_FAILED = "{compile_marker}"


class RunnerUnavailable(RuntimeError):
    """A language cannot be run here: ``tool`` (a program, library or file) is missing or unusable."""

    def __init__(self, language: str, tool: str, detail: str = "", *, transient: bool = False) -> None:
        self.language, self.tool, self.detail = language, tool, detail
        self.transient = transient  # the probe itself was cut short (time limit, no free sandbox uid): not cached
        super().__init__(f"{language}: {tool} is not available in the sandbox" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class RunOutcome:
    """One run: the sandbox result, the verdict, whether the marker proved it, and whether compilation failed."""

    passed: bool
    result: ExecutionResult
    proved: bool
    compile_error: bool = False


@dataclass(frozen=True)
class Runner:
    """How to run one language. ``command`` is an argv (``{python}`` stands for ``sandbox_python()``);
    ``{compile_marker}`` in it is replaced by a per-run token printed to stderr when compilation fails.
    ``marker_statement`` writes ``{marker}`` on its own line; ``proof`` says where it goes: ``append`` (after
    the tests), ``main_close`` (before the last ``}``), ``class_main_close`` (before the last-but-one ``}``).
    ``prelude`` is prepended to the program (the C++ proof needs ``<cstdio>``)."""

    language: str
    filename: str
    command: tuple[str, ...]
    tools: tuple[str, ...]
    limits: Limits
    marker_statement: str
    proof: str = "append"
    prelude: str = ""
    probe: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    def with_limits(self, **changes: object) -> Runner:
        """A copy with some limits changed, e.g. ``get_runner("cpp").with_limits(timeout_s=60)``."""
        return dataclasses.replace(self, limits=dataclasses.replace(self.limits, **changes))

    def program(self, prompt: str, completion: str, tests: str, marker: str | None) -> tuple[str, bool]:
        """``prompt + completion + "\\n" + tests`` with the marker statement placed; (source, marker placed)."""
        plain = f"{prompt}{completion}\n{tests}"
        if marker is None:
            return plain, False
        statement = self.marker_statement.replace("{marker}", marker)
        if self.proof == "append":
            return f"{plain}\n{statement}\n", True
        body = tests.rstrip()
        closes = [i for i, ch in enumerate(body) if ch == "}"]
        if self.proof == "main_close" and closes and closes[-1] == len(body) - 1:
            at = closes[-1]
        elif (
            self.proof == "class_main_close"
            and len(closes) >= 2
            and closes[-1] == len(body) - 1
            and not body[closes[-2] + 1 : closes[-1]].strip()
        ):
            at = closes[-2]
        else:
            return plain, False
        line_start = body.rfind("\n", 0, at) + 1
        if not body[line_start:at].strip():  # the brace starts its line: insert the statement above that line
            at = line_start
        proved_tests = f"{body[:at]}    {statement}\n{body[at:]}\n"
        return f"{self.prelude}{prompt}{completion}\n{proved_tests}", True


_JVM_FLAGS = (
    "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss16m -Xmx512m -XX:ReservedCodeCacheSize=64m "
    "-XX:CompressedClassSpaceSize=64m -XX:MaxMetaspaceSize=256m"
)
_JAVAC_FLAGS = " ".join(f"-J{flag}" for flag in _JVM_FLAGS.split())


def _compiled(compile_cmd: str, run_cmd: str) -> tuple[str, ...]:
    script = f'{compile_cmd} || {{ echo "{_COMPILE_FAILED}" >&2; exit 1; }}\nexec {run_cmd}\n'
    return ("sh", "-c", script)


RUNNERS: dict[str, Runner] = {
    "py": Runner(
        "py",
        "main.py",
        ("{python}", "-E", "-s", "-B", "main.py"),
        ("python3",),
        Limits(timeout_s=10.0, memory_mb=1024, max_processes=8),
        "import os as _dft_os\n_dft_os.write(1, b'\\n{marker}\\n')",
        probe="print('ok')\n",
    ),
    "js": Runner(
        "js",
        "main.js",
        ("node", "main.js"),
        ("node",),
        Limits(timeout_s=10.0, memory_mb=2048, max_processes=32),
        "require('fs').writeSync(1, '\\n{marker}\\n');",
        probe="console.log('ok');\n",
    ),
    "cpp": Runner(
        "cpp",
        "main.cpp",
        _compiled("g++ -std=c++17 -o main main.cpp", "./main"),
        ("sh", "g++"),
        Limits(timeout_s=30.0, memory_mb=2048, max_processes=16, max_file_mb=64),
        'std::fputs("\\n{marker}\\n", stdout); std::fflush(stdout);',
        proof="main_close",
        prelude="#include <cstdio>\n",
        probe='#include <cstdio>\nint main() { std::puts("ok"); }\n',
    ),
    "java": Runner(
        "java",
        "Problem.java",
        _compiled(
            f"javac {_JAVAC_FLAGS} -encoding UTF-8 -cp .:{_JAR_NAME} -d . Problem.java",
            f"java {_JVM_FLAGS} -ea -cp .:{_JAR_NAME} Problem",
        ),
        ("sh", "javac", "java"),
        Limits(timeout_s=30.0, memory_mb=2048, max_processes=64, max_file_mb=64),
        'System.out.print("\\n{marker}\\n"); System.out.flush();',
        proof="class_main_close",
        probe='class Problem { public static void main(String[] a) { System.out.println("ok"); } }\n',
        env={"MALLOC_ARENA_MAX": "2"},
    ),
    "php": Runner(
        "php",
        "main.php",
        ("php", "main.php"),
        ("php",),
        Limits(timeout_s=10.0, memory_mb=1024, max_processes=8),
        'echo "\\n{marker}\\n";',
        probe='<?php\necho "ok\\n";\n',
    ),
    "sh": Runner(
        "sh",
        "main.sh",
        ("bash", "main.sh"),
        ("bash",),
        Limits(timeout_s=10.0, memory_mb=1024, max_processes=32),
        "printf '\\n%s\\n' '{marker}'",
        probe="echo ok\n",
    ),
    "pl": Runner(
        "pl",
        "main.pl",
        ("perl", "main.pl"),
        ("perl",),
        Limits(timeout_s=10.0, memory_mb=1024, max_processes=8),
        'print "\\n{marker}\\n";',
        probe='print "ok\\n";\n',
    ),
}

LANGUAGE_ALIASES = {
    "python": "py",
    "python3": "py",
    "javascript": "js",
    "node": "js",
    "c++": "cpp",
    "bash": "sh",
    "shell": "sh",
    "perl": "pl",
}


def canonical_language(language: str) -> str:
    """MultiPL-E's short name for ``language`` (``"javascript"`` -> ``"js"``); unknown names pass through."""
    key = language.strip().lower()
    return LANGUAGE_ALIASES.get(key, key)


def get_runner(language: str, runners: Mapping[str, Runner] | None = None) -> Runner:
    """The runner for ``language`` from ``runners`` (default ``RUNNERS``); ``RunnerUnavailable`` if none exists."""
    table = RUNNERS if runners is None else runners
    key = canonical_language(language)
    if key not in table:
        raise RunnerUnavailable(key, f"a runner for {key!r}", f"known languages: {', '.join(sorted(table))}")
    return table[key]


# ------------------------------------------------------------------------------------------------ availability

_lock = threading.Lock()
_probed: dict[tuple, RunnerUnavailable | None] = {}


def find_javatuples_jar() -> Path | None:
    """The javatuples jar: ``$DFT_JAVATUPLES_JAR`` when set (even if that file is missing), else the first
    existing file of ``JAVATUPLES_CANDIDATES``."""
    configured = os.environ.get(_JAVATUPLES_ENV)
    if configured:
        return Path(configured)
    return next((Path(p) for p in JAVATUPLES_CANDIDATES if Path(p).is_file()), None)


def _argv(runner: Runner, compile_marker: str) -> list[str]:
    argv = []
    for part in runner.command:
        if part == "{python}":
            part = sandbox_python()
        argv.append(part.replace(_COMPILE_FAILED, compile_marker))
    return argv


def _execute(runner: Runner, source: str, limits: Limits | None) -> tuple[ExecutionResult, bool]:
    """Run ``source`` with ``runner``: (result, compilation failed). No availability check."""
    compile_marker = f"DFT-COMPILE-FAILED-{secrets.token_hex(8)}"
    files: dict[str, str | bytes] = {runner.filename: source}
    if runner.language == "java":
        jar = find_javatuples_jar()
        if jar is not None and jar.is_file():
            files[_JAR_NAME] = jar.read_bytes()
    result = run_command(_argv(runner, compile_marker), files=files, limits=limits or runner.limits, env=runner.env)
    return result, compile_marker in result.stderr


def _probe_toolchain(runner: Runner) -> RunnerUnavailable | None:
    for tool in runner.tools:
        if shutil.which(tool, path=SANDBOX_PATH) is None:
            return RunnerUnavailable(runner.language, tool, f"not found on {SANDBOX_PATH}")
    try:
        result, compile_failed = _execute(runner, runner.probe, None)
    except SandboxError as exc:  # no interpreter the sandbox uid can run (``sandbox_python``)
        return RunnerUnavailable(runner.language, runner.tools[0], str(exc))
    if result.ok and result.stdout.strip() == "ok":
        return None
    stage, tool = ("compiling", runner.tools[1]) if compile_failed else ("running", runner.tools[-1])
    tail = (result.stderr.strip() or result.reason)[-300:]
    transient = result.status == "timeout" or (result.status == "error" and "sandbox uid" in result.reason)
    detail = f"{stage} a test program failed under the sandbox: {result.status}: {tail}"
    return RunnerUnavailable(runner.language, tool, detail, transient=transient)


def _probe_perl_module(runner: Runner, module: str) -> RunnerUnavailable | None:
    result = run_command(["perl", f"-M{module}", "-e", "print qq(ok\\n)"], limits=runner.limits)
    if result.ok and result.stdout.strip() == "ok":
        return None
    return RunnerUnavailable(runner.language, f"Perl module {module}", "Debian: libtest-deep-perl")


_TEST_DEEP_RE = re.compile(r"^\s*use\s+Test::Deep\b", re.MULTILINE)


def _requirements(runner: Runner, source: str) -> list[tuple[tuple, Callable[[Runner], RunnerUnavailable | None]]]:
    """(cache key, check) for each library ``source`` needs beyond the toolchain."""
    needs: list[tuple[tuple, Callable[[Runner], RunnerUnavailable | None]]] = []
    if runner.language == "java" and "org.javatuples" in source:
        needs.append((("jar", str(find_javatuples_jar())), _check_javatuples))
    if runner.language == "pl" and _TEST_DEEP_RE.search(source):
        needs.append((("perl", "Test::Deep"), lambda r: _probe_perl_module(r, "Test::Deep")))
    return needs


def _check_javatuples(runner: Runner) -> RunnerUnavailable | None:
    jar = find_javatuples_jar()
    if jar is None:
        where = ", ".join(JAVATUPLES_CANDIDATES)
        return RunnerUnavailable(
            runner.language, "javatuples jar", f"set ${_JAVATUPLES_ENV} or install it at one of: {where}"
        )
    if not jar.is_file():
        return RunnerUnavailable(runner.language, "javatuples jar", f"{jar} (from ${_JAVATUPLES_ENV}) does not exist")
    return None


def _cached(key: tuple, check: Callable[[], RunnerUnavailable | None]) -> RunnerUnavailable | None:
    with _lock:
        if key in _probed:
            return _probed[key]
    outcome = check()
    if outcome is not None and outcome.transient:
        return outcome
    with _lock:
        _probed.setdefault(key, outcome)
        return _probed[key]


def check_available(language: str | Runner, source: str | None = None, *, refresh: bool = False) -> Runner:
    """Return the runner when it works here (and ``source``'s libraries are present); else raise
    ``RunnerUnavailable``. Probes are cached per process (``refresh=True`` probes again)."""
    runner = language if isinstance(language, Runner) else get_runner(language)
    toolchain_key = ("toolchain", runner.language, runner.command, runner.tools, runner.limits, runner.probe)
    if refresh:
        with _lock:
            _probed.clear()
    missing = _cached(toolchain_key, lambda: _probe_toolchain(runner))
    if missing is not None:
        raise missing
    for key, check in _requirements(runner, source or ""):
        missing = _cached((runner.language, *key), lambda check=check: check(runner))
        if missing is not None:
            raise missing
    return runner


def available_languages(languages: list[str] | None = None) -> dict[str, str | None]:
    """``{language: None}`` for languages that run here, ``{language: "why not"}`` for the others."""
    report: dict[str, str | None] = {}
    for language in languages or list(RUNNERS):
        try:
            check_available(language)
            report[canonical_language(language)] = None
        except RunnerUnavailable as exc:
            report[canonical_language(language)] = str(exc)
    return report


def run_source(
    language: str | Runner, source: str, *, marker: str | None = None, limits: Limits | None = None
) -> RunOutcome:
    """Run a complete program (e.g. from ``Runner.program``) and judge it: exit code 0, and ``marker`` on its own
    line of stdout when a marker is given. Raises ``RunnerUnavailable`` when the language cannot run here."""
    runner = check_available(language, source)
    result, compile_failed = _execute(runner, source, limits)
    passed = result.status == "ok" and result.returncode == 0
    if marker is not None:
        passed = passed and marker in result.stdout.splitlines()
    return RunOutcome(passed, result, marker is not None, compile_failed)
