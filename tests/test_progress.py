"""Progress outside the training loop: evaluation (standalone and relayed by the callback) and tokenising show a
live line on a terminal (a pseudo-terminal here) and plain lines, without carriage returns, otherwise."""

from __future__ import annotations

import io
import os
import pty
import re
import sys
import types

import pytest

from dft_lightning.evaluation.callback import EvaluationCallback, _Child
from dft_lightning.progress import Progress
from tests.conftest import write_rows

LINE = r"{what}: (\d+)/{total} {unit} \(\d+%\)  [\d.]+ {unit}/s  elapsed \d:\d\d:\d\d(  eta \d:\d\d:\d\d)?"


@pytest.fixture
def terminal():
    """A writable stream on a pseudo-terminal, and a function reading what reached its other end."""
    leader, follower = pty.openpty()
    stream = os.fdopen(follower, "w")

    def read() -> str:
        stream.flush()
        os.set_blocking(leader, False)
        chunks = []
        try:
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        return b"".join(chunks).decode()

    yield stream, read
    stream.close()
    os.close(leader)


def test_a_terminal_gets_one_live_line_a_log_gets_plain_lines(terminal):
    stream, read = terminal
    assert stream.isatty()
    with Progress("generating", 4, "problems", stream=stream, redraw_s=0.0) as live:
        for _ in range(4):
            live.update()
    shown = read()
    assert shown.count("\r") >= 4 and shown.endswith("generating: 4/4 problems (100%)" + shown.split("(100%)")[-1])
    assert "eta" in shown and shown.rstrip("\r\n").count("\n") == 0  # one line, redrawn; a newline only at the end

    log = io.StringIO()
    with Progress("grading", 3, "completions", stream=log, every_s=0.0) as plain:
        for _ in range(3):
            plain.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4  # every update (every_s=0), and the last line again
    assert all(re.fullmatch(LINE.format(what="grading", total=3, unit="completions"), line) for line in lines)
    assert "eta" in lines[0] and lines[-1].startswith("grading: 3/3 completions (100%)")

    quiet = io.StringIO()
    with Progress("grading", 3, "completions", stream=quiet, every_s=3600.0) as slow:
        slow.update(3)
    assert quiet.getvalue().splitlines() == [quiet.getvalue().strip()]  # short work: its last line only


MATH_ROWS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]


def evaluate_tiny(tmp_path, tiny_dir):
    from dft_lightning.evaluation.run import main as evaluate_main

    rows = write_rows(tmp_path / "math.jsonl", MATH_ROWS)
    evaluate_main(["--model", str(tiny_dir), "--benchmarks", f"[{{name: m, kind: math500, source: {rows}}}]",
                   "--engine", "{kind: hf, batch_size: 2}", "--sampling", "{n: 2, temperature: 1.0, max_tokens: 3}",
                   f"--output_dir={tmp_path / 'out'}"])


def test_the_evaluate_command_shows_problems_generated_and_graded(tmp_path, tiny_dir, monkeypatch, capsys, terminal):
    monkeypatch.setenv("DFT_LIGHTNING_PROGRESS_EVERY_S", "0")
    evaluate_tiny(tmp_path, tiny_dir)  # standard error is not a terminal here: plain lines
    err = capsys.readouterr().err
    generating = [line for line in err.splitlines() if line.startswith("generating:")]
    grading = [line for line in err.splitlines() if line.startswith("grading:")]
    assert "\r" not in err
    assert [re.fullmatch(LINE.format(what="generating", total=4, unit="problems"), line)[1] for line in generating] \
        == ["1", "2", "3", "4", "4"]  # a batch of 2 rows is one problem's 2 samples; then the last line
    assert all(re.fullmatch(LINE.format(what="grading", total=8, unit="completions"), line) for line in grading)
    assert grading[-1].startswith("grading: 8/8 completions (100%)") and len(grading) >= 2

    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    evaluate_tiny(tmp_path, tiny_dir)
    shown = read()
    assert "\rgenerating: 4/4 problems" in shown.replace("\x1b[2K", "") and "\r" in shown
    assert "grading: 8/8 completions (100%)" in shown


def test_the_callback_relays_its_childs_progress_as_plain_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DFT_LIGHTNING_PROGRESS_EVERY_S", "0")
    code = ("import sys, time\n"
            "for i in range(1, 4):\n"
            "    print(f'generating: {i}/3 problems ({100 * i // 3}%)  1.00 problems/s  elapsed 0:00:0{i}', "
            "file=sys.stderr, flush=True)\n"
            "    time.sleep(0.4)\n")
    child = _Child([sys.executable, "-c", code], dict(os.environ), tmp_path / "evaluate.log",
                   tmp_path / "summary.json", None)
    callback = EvaluationCallback([{"name": "b", "kind": "math500", "source": "x.jsonl"}])
    callback.poll_s = 0.1
    trainer = types.SimpleNamespace(world_size=1, global_step=7, is_global_zero=True)
    callback._wait(trainer, child)
    lines = [line for line in capsys.readouterr().out.splitlines() if "evaluation at step 7" in line]
    assert lines and lines[-1].startswith("[dft_lightning] evaluation at step 7: generating: 3/3 problems (100%)")
    assert len(lines) == len(set(lines))  # a line is relayed once


def test_tokenising_a_long_source_shows_rows_done(tmp_path, tiny_dir, monkeypatch, capsys, terminal):
    from dft_lightning.data import module as data_module
    from dft_lightning.data.module import ChatDataModule

    monkeypatch.setattr(data_module, "PROGRESS_MIN_ROWS", 4)
    monkeypatch.setenv("DFT_LIGHTNING_PROGRESS_EVERY_S", "0")
    rows = write_rows(tmp_path / "train.jsonl", [{"prompt": f"{i} + 1?", "response": f"{i + 1}"} for i in range(6)])

    def tokenise() -> None:
        dm = ChatDataModule(train=str(rows), tokenizer=str(tiny_dir), batch_size=2, max_length=256, cache=False)
        dm.tokenizer = dm.load_tokenizer()
        dm.tokenise(str(rows), "data.train", "train")

    tokenise()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenising data.train:")]
    assert "\r" not in err and lines[-1].startswith("tokenising data.train: 6/6 rows (100%)") and len(lines) >= 6
    assert all(re.fullmatch(LINE.format(what="tokenising data.train", total=6, unit="rows"), line) for line in lines)

    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    tokenise()
    shown = read()
    assert "\r" in shown and "tokenising data.train: 6/6 rows (100%)" in shown
