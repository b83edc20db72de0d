"""Nothing lost under kills, pre-emption and failed writes (docs/reliability.md).

Runs go through the CLI in subprocesses with faults injected by ``tests.faults`` callbacks
(``--trainer.callbacks+=``). "Resumes exactly" means: the per-step ``train/nll`` logged after the
resume equals the uninterrupted run's at the same steps (to 1e-6 relative, fp32 on CPU; a wrong
data position or a lost optimizer / scheduler state moves it by more than 1e-3).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dft_lightning.checkpointing import PARTIAL_PREFIX, AtomicCheckpointIO, publish
from dft_lightning.errors import StorageError
from tests.conftest import REPO, read_metrics

TINY = str(REPO / "conf" / "tiny.yaml")
FSDP2 = ["--config", str(REPO / "conf" / "overlays" / "fsdp2.yaml"), "--trainer.devices=2",
         "--data.init_args.micro_batch_size=2", "--trainer.strategy.init_args.timeout=0:02:00"]
COMMON = ["--trainer.max_steps=6", "--data.init_args.num_train=32", "--trainer.limit_val_batches=0",
          "--trainer.enable_progress_bar=false"]  # 4 steps per epoch: resumes mid-epoch and crosses an epoch
BOUND_S = 60  # a dead rank must end the job well before the 2-minute process-group timeout above


def checkpoints(dirpath: Path) -> list[str]:
    return ["--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=0",
            "--trainer.callbacks.save_last=true", f"--trainer.callbacks.dirpath={dirpath}"]


def fault(name: str, **init: object) -> list[str]:
    return [f"--trainer.callbacks+=tests.faults.{name}", *(f"--trainer.callbacks.{k}={v}" for k, v in init.items())]


def launch(tmp_path: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``fit`` in its own process group; output goes to ``<root>/log``."""
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "DFT_FAULTS_DIR": str(root / "faults"), **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "dft_lightning", "fit", "--config", TINY, f"--trainer.default_root_dir={root}",
            f"--data.init_args.data_dir={tmp_path / 'data'}", *COMMON, *fault("RecordPids"), *extra]
    log = (root / "log").open("w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc, root


def finish(proc: subprocess.Popen, root: Path, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run did not end in {timeout} s:\n{log_tail(root)}") from None


def log_tail(root: Path, chars: int = 4000) -> str:
    return (root / "log").read_text()[-chars:]


def run(tmp_path: Path, name: str, *extra: str, env: dict[str, str] | None = None, expect: int = 0) -> Path:
    proc, root = launch(tmp_path, name, *extra, env=env)
    code = finish(proc, root)
    assert code == expect, f"exit {code}, expected {expect}:\n{log_tail(root)}"
    return root


def nll_by_step(root: Path, version: str | None = None) -> dict[int, float]:
    if version is None:
        rows = read_metrics(root)
    else:
        import csv

        with next(root.rglob(f"{version}/metrics.csv")).open() as f:
            rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/nll"]) for r in rows if r.get("train/nll")}


def assert_same_losses(resumed: dict[int, float], straight: dict[int, float], steps: range) -> None:
    assert sorted(resumed) == list(steps), sorted(resumed)
    for step in steps:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), (step, resumed, straight)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


def wait_for(paths: list[Path], proc: subprocess.Popen, root: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"run ended early ({proc.returncode}):\n{log_tail(root)}"
        assert time.monotonic() < deadline, f"no {paths} after {timeout} s:\n{log_tail(root)}"
        time.sleep(0.2)


def saved_step(checkpoint: Path) -> int:
    """``global_step`` of a Lightning checkpoint (a file, or a sharded directory's ``meta.pt``)."""
    path = checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# -- two processes, FSDP2 (sharded checkpoints): kill the group, a rank dies mid-save, SIGTERM one rank ----------
@pytest.mark.slow
def test_fsdp2_runs_survive_a_killed_group_a_dead_rank_and_sigterm_and_resume_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    last = ckpt / "last.ckpt"
    straight = nll_by_step(run(tmp_path, "straight", *FSDP2))
    assert sorted(straight) == list(range(6))

    # 1. The whole process group is killed (SIGKILL) during step 3, after the sharded checkpoint of step 2.
    proc, root = launch(tmp_path, "killed", *FSDP2, *checkpoints(ckpt), *fault("PauseAtStep", step=2))
    wait_for([root / "faults" / "paused-rank-0", root / "faults" / "paused-rank-1"], proc, root)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert last.is_dir() and saved_step(last) == 2

    # 2. Resumed; rank 1 dies (os._exit) half-way through writing the sharded checkpoint of step 4. Rank 0 must
    #    not wait out the process-group timeout, and `last` must still be step 2's complete checkpoint.
    proc, root = launch(tmp_path, "rank-dies", *FSDP2, *checkpoints(ckpt), "--ckpt_path=last",
                        *fault("DieDuringSave", step=4, rank=1))
    code = finish(proc, root)
    ended = time.time()
    died = float((root / "faults" / "died-rank-1").read_text())
    assert code != 0 and ended - died < BOUND_S, (code, ended - died, log_tail(root))
    pids = [int((root / "faults" / f"rank-{r}.pid").read_text()) for r in (0, 1)]
    assert not any(alive(pid) for pid in pids)
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(PARTIAL_PREFIX)], "the torn write was elsewhere"
    assert saved_step(last) == 2

    # 3. Resumed from `last` again; SIGTERM reaches rank 0 only, during step 5: both ranks save and stop.
    root = run(tmp_path, "sigterm", *FSDP2, *checkpoints(ckpt), "--ckpt_path=last",
               *fault("SignalAtStep", step=4, signum="SIGTERM", rank=0), expect=128 + signal.SIGTERM)
    assert f"SIGTERM: checkpoint of step 5 saved to {last}; resume with --ckpt_path={last}" in log_tail(root)
    assert saved_step(last) == 5
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(PARTIAL_PREFIX)]  # the torn write is gone
    assert_same_losses(nll_by_step(root), straight, range(2, 5))

    root = run(tmp_path, "resumed", *FSDP2, *checkpoints(ckpt), "--ckpt_path=last")
    assert_same_losses(nll_by_step(root), straight, range(5, 6))


# -- one process: SIGTERM without SLURM, then SLURM's requeue signal with scontrol mocked ------------------------
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "fit", "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
def test_sigterm_and_slurm_requeue_save_a_checkpoint_exit_cleanly_and_resume_exactly(tmp_path):
    straight = nll_by_step(run(tmp_path, "straight"))

    # Plain SIGTERM, no ModelCheckpoint (conf/tiny.yaml): saved under the log directory, path printed.
    root = run(tmp_path, "sigterm", *fault("SignalAtStep", step=2, signum="SIGTERM"), expect=128 + signal.SIGTERM)
    saved = next(root.rglob("checkpoints/last.ckpt"))
    assert saved_step(saved) == 3
    assert f"SIGTERM: checkpoint of step 3 saved to {saved}; resume with --ckpt_path={saved}" in log_tail(root)
    assert "Traceback" not in log_tail(root)
    assert_same_losses(nll_by_step(root), straight, range(0, 3))

    # Resumed under SLURM; the requeue signal (SIGUSR1) during step 5: an hpc checkpoint, scontrol requeue.
    slurm = fake_slurm(tmp_path)
    job = tmp_path / "job"
    root = run(tmp_path, "job", f"--ckpt_path={saved}", *fault("SignalAtStep", step=4, signum="SIGUSR1"),
               env=slurm, expect=128 + signal.SIGUSR1)
    assert root == job and saved_step(job / "hpc_ckpt_1.ckpt") == 5
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "SIGUSR1: checkpoint of step 5 saved to" in log_tail(root) and "job 4242 requeued" in log_tail(root)
    assert_same_losses(nll_by_step(job, "version_0"), straight, range(3, 5))

    # The requeued job: the same command line, no --ckpt_path: Lightning resumes from the hpc checkpoint.
    run(tmp_path, "job", env=slurm)
    assert_same_losses(nll_by_step(job, "version_1"), straight, range(5, 6))


# -- atomic writes and a full disk, in this process ----------------------------------------------------------------
def test_a_crash_while_writing_a_checkpoint_file_leaves_the_previous_one(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, target)

    pid = os.fork()  # the child dies (no clean-up at all) after writing part of the new checkpoint
    if pid == 0:
        def half_then_die(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04" + b"\0" * 4096)
            f.flush()
            os._exit(7)

        torch.save = half_then_die
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] >> 8 == 7
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(PARTIAL_PREFIX) and "last" not in leftovers[0]
    assert io.load_checkpoint(target)["global_step"] == 1

    io.save_checkpoint({"global_step": 3}, target)  # the next save replaces it and removes the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(target)["global_step"] == 3


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "move-aside"])
def test_a_directory_checkpoint_is_swapped_whole(tmp_path, monkeypatch, exchange):
    from dft_lightning import paths

    if not exchange:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    target, partial = tmp_path / "last.ckpt", tmp_path / f"{PARTIAL_PREFIX}new"
    target.mkdir()
    (target / "a.distcp").write_text("old")
    partial.mkdir()
    (partial / "a.distcp").write_text("new")
    (partial / "meta.pt").write_text("new")
    publish(partial, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["a.distcp", "meta.pt"]
    assert (target / "a.distcp").read_text() == "new"


def test_a_sharded_checkpoint_replaces_a_one_file_one_and_back(tmp_path):
    """The same dirpath used by a one-process run (``last.ckpt`` a file) and then a sharded one (a directory)."""
    target, partial = tmp_path / "last.ckpt", tmp_path / f"{PARTIAL_PREFIX}sharded"
    target.write_text("one file")
    partial.mkdir()
    (partial / "a.distcp").write_text("sharded")
    publish(partial, target)
    assert (target / "a.distcp").read_text() == "sharded" and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"global_step": 7}, target)
    assert target.is_file() and AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 7


def test_a_full_disk_while_saving_is_one_line_naming_the_path_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys
):
    from dft_lightning.cli import main

    saves = []
    original = torch.save

    def full_on_third(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            saves.append(obj["global_step"])
        if len(saves) == 3 and isinstance(obj, dict) and "global_step" in obj:
            f.write(b"PK\x03\x04" + b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_third)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_train=16",
              f"--data.init_args.data_dir={tmp_path / 'data'}", "--trainer.num_sanity_val_steps=0",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", *checkpoints(ckpt),
              "--trainer.callbacks.every_n_train_steps=1", "--trainer.max_steps=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: checkpoint {ckpt / 'last.ckpt'} could not be written (No space left on device); the "
                       "previous checkpoint there is kept and nothing partial was left: free space (or choose another "
                       "ModelCheckpoint dirpath) and resume from it")
    assert not any("Traceback" in line for line in err)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    assert saved_step(ckpt / "last.ckpt") == 2


def test_storage_error_names_the_target_not_the_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(StorageError, match=rf"checkpoint {tmp_path / 'x.ckpt'} could not be written \(Permission"
                                           r" denied\); .*: fix that \(or choose"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []
