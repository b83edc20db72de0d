"""tools/gpu_check.py keeps working: its --tiny mode runs the same FSDP2 + checkpointing path on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_tiny_runs_sft_and_dft_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--tiny", "--steps", "2", "--warmup", "1",
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DFT / SFT step time:" in proc.stdout
    report = json.loads(out.read_text())
    results = {r["objective"]: r for r in report["results"]}
    assert results.keys() == {"SFT", "DFT"}
    for result in results.values():
        assert result["params"] > 0 and math.isfinite(result["step_s"]) and result["step_s"] > 0
        # every row is fully supervised: a step has micro-batch x (seq_len - 1) targets x accumulation
        per_step = report["args"]["micro_batch"] * (report["args"]["seq_len"] - 1) * report["args"]["accumulation"]
        assert math.isclose(result["tokens_per_s_per_gpu"] * result["step_s"], per_step, rel_tol=1e-6)
    assert report["args"]["seq_len"] == 128 and report["args"]["tiny"] is True
