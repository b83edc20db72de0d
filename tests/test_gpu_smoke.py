"""tools/gpu_smoke.py --cpu: the GPU smoke script's whole path (Table 1 config, FSDP2 overlay, sharded checkpoint,
HF export, evaluation with the HF engine) on the shipped Qwen2.5-Math-1.5B config, shrunk, for one step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_smoke_cpu_runs_every_stage(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_smoke.py"), "--cpu", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + json.dumps(report, indent=1)[-3000:]
    stages = report["stages"]
    assert list(stages) == ["model", "fit", "export", "evaluate"]
    assert len(stages["fit"]["losses"]) == 1 and stages["fit"]["checkpoints"] and stages["fit"]["exports"]
    assert stages["export"]["missing"] == [] and stages["export"]["changed_by_training"] > 0
    assert {f"eval/{b}/avg@1" for b in ("math500", "minerva", "olympiadbench", "aime24", "amc23")} <= set(
        stages["evaluate"]["metrics"])


def test_shipped_config_is_the_real_architecture():
    config = json.loads((REPO / "tools" / "assets" / "qwen25_math_1p5b" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        "qwen2", 1536, 28, 151936)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tools" / "assets" / "qwen25_math_1p5b")
    assert len(tokenizer) < config["vocab_size"] and tokenizer.chat_template
