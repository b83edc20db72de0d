"""Shared fixtures: offline settings, a persistent artefact cache, the tiny model, CLI runners."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DFT_LIGHTNING_CACHE", str(REPO / ".cache" / "dft_lightning"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(autouse=True)
def _no_state_leaks_into_later_tests():
    """In-process runs leave process-wide state behind: a one-process group (FSDP2 on one device) and its
    ``MASTER_PORT`` in ``os.environ``, which every later subprocess would inherit and find taken; W&B's settings
    singleton (a test's base URL or API key). Each test ends with them restored."""
    from dft_lightning.evaluation.engine_base import DISTRIBUTED_ENV

    saved = {name: os.environ.get(name) for name in DISTRIBUTED_ENV}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from dft_lightning.tiny import tiny_model_dir

    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from dft_lightning.pretrained import load_tokenizer

    return load_tokenizer(str(tiny_dir))


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``python -m dft_lightning`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "dft_lightning", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def read_metrics(root: Path) -> list[dict[str, str]]:
    """Rows of the (single) CSVLogger metrics file under ``root``."""
    files = sorted(root.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    """Write ``rows`` as JSON lines, then ``extra_lines`` verbatim (e.g. malformed JSON)."""
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]
