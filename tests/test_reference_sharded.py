"""A moving reference under FSDP2: sharded checkpoints hold its shards (not a gathered copy in the metadata),
and a two-process run resumed from one reproduces the losses and the reference of the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "fsdp2_reference_run.py"


def run(out, data, steps, ckpt=None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(SCRIPT), str(out), str(data), str(steps), *([str(ckpt)] if ckpt else [])]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two two-process launches; a loaded machine takes long
def test_fsdp2_checkpoint_holds_reference_shards_and_resume_reproduces_losses(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    whole = run(tmp_path / "whole", tmp_path / "data", steps=5)
    ckpt = tmp_path / "whole" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_dir()
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    reference = {k for k in keys if k.startswith("state_dict._reference.")}
    policy = {k.replace("state_dict.model.", "state_dict._reference.", 1) for k in keys
              if k.startswith("state_dict.model.")}
    assert reference and reference == policy  # every parameter of the reference, as shards like the policy's
    meta = torch.load(ckpt / "meta.pt", weights_only=False)["dft_lightning"]
    assert meta.get("reference_sharded") is True and "reference" not in meta  # no gathered copy per rank

    resumed = run(tmp_path / "resumed", tmp_path / "data", steps=5, ckpt=ckpt)
    assert len(whole["losses"]) == 5 and len(resumed["losses"]) == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"][3:]), rtol=1e-6,
                               atol=1e-7)
    assert resumed["reference"] == whole["reference"]
