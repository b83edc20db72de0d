"""A mid-epoch checkpoint resumes on another number of processes: two CPU processes (gloo) to one, and one
to two, through the CLI, with DDP and with FSDP2 (its sharded checkpoint is resharded on load).

The global batch (``data.batch_size``, 8 rows) is the same in every run and the micro-batch too (2 rows), so the
accumulation adapts: two micro-batches per rank on two processes, four on one. The step sampler orders rows by
global step and splits each step's rows across ranks, so a resumed run must train on exactly the rows the
uninterrupted run trained on after the checkpoint, each once (checked with ``tests.row_log.RowLog``), with the
same losses. Tolerance: 2e-4 absolute on the per-step NLL (as tests/test_distributed.py: the runs differ only in
the order of floating-point sums, ~1e-6 per step in fp32; a repeated or skipped batch, a restarted schedule or a
lost optimizer state moves the NLL by far more on this data).
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_metrics, run_cli, series
from tests.row_log import read_row_log

TINY = str(REPO / "conf" / "tiny.yaml")
FSDP2 = str(REPO / "conf" / "overlays" / "fsdp2.yaml")
STEPS, SAVED_AT = 5, 2


def _callbacks(tmp_path, name: str) -> str:
    """A config adding a checkpoint every 2 steps (all kept) and the row log."""
    path = tmp_path / f"{name}-callbacks.yaml"
    path.write_text(f"""trainer:
  enable_checkpointing: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{tmp_path / name / 'ckpt'}", every_n_train_steps: {SAVED_AT}, save_top_k: -1,
                  filename: "step-{{step}}"}}
    - class_path: tests.row_log.RowLog
      init_args: {{path: "{tmp_path / name / 'rows'}"}}
""")
    return str(path)


def _fit(tmp_path, name: str, devices: int, strategy: str, *extra: str) -> tuple[list[float], dict[int, list]]:
    root = tmp_path / name
    root.mkdir()
    configs = ["--config", TINY, *(["--config", FSDP2] if strategy == "fsdp2" else []),
               "--config", _callbacks(tmp_path, name)]
    args = ["fit", *configs, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}",
            f"--trainer.devices={devices}", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
            f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.batch_size=8",
            "--data.init_args.micro_batch_size=2", "--model.lr=0.003", *extra]
    if strategy == "ddp":
        args.append("--trainer.strategy=ddp")
    result = run_cli(args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return series(read_metrics(root), "train/nll"), read_row_log(root / "rows")


def _checkpoint(tmp_path, name: str):
    found = sorted((tmp_path / name / "ckpt").glob(f"step-step={SAVED_AT}*"))
    assert found, f"no step-{SAVED_AT} checkpoint in {tmp_path / name / 'ckpt'}"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "first", "then"), [("ddp", 2, 1), ("ddp", 1, 2), ("fsdp2", 2, 1)],
                         ids=["ddp-2-to-1", "ddp-1-to-2", "fsdp2-2-to-1"])
def test_resume_on_another_number_of_processes(tmp_path, strategy, first, then):
    full_nll, full_rows = _fit(tmp_path, "full", first, strategy)
    assert len(full_nll) == STEPS and sorted(full_rows) == list(range(STEPS))
    seen = [r for step in full_rows.values() for r in step]
    assert len(seen) == len(set(seen)) == STEPS * 8  # one epoch so far: every row at most once

    ckpt = _checkpoint(tmp_path, "full")
    resumed_nll, resumed_rows = _fit(tmp_path, "resumed", then, strategy, f"--ckpt_path={ckpt}")
    assert sorted(resumed_rows) == list(range(SAVED_AT, STEPS))  # the steps after the checkpoint, nothing else
    for step, rows in resumed_rows.items():  # the same rows as the uninterrupted run: none repeated, none skipped
        assert rows == full_rows[step], step
    assert resumed_nll == pytest.approx(full_nll[SAVED_AT:], abs=2e-4), (resumed_nll, full_nll)
