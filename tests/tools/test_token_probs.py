"""tools/token_probs.py: the probability of every supervised token, per model, with tables, JSON and a PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import token_probs
import torch
from PIL import Image

from tests.conftest import REPO

TINY = str(REPO / "conf" / "tiny.yaml")


@pytest.fixture(scope="module")
def sharpened(tiny_dir, tmp_path_factory):
    """The tiny model with its final norm scaled up: confident, spread-out probabilities unlike the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.norm.weight.mul_(25.0)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * 0.3)
    out = tmp_path_factory.mktemp("sharpened")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def data_args(tmp_path):
    return [f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.num_train=8",
            "--data.init_args.num_test=4", "--data.init_args.batch_size=4", "--data.init_args.micro_batch_size=3"]


def direct_probabilities(model_dir, mb):
    """Full-vocabulary softmax of an HF model on one micro-batch: ``[rows, time - 1]`` target probabilities."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=mb.position_ids).logits.double()
    probs = logits.softmax(-1)[:, :-1]
    targets = mb.labels[:, 1:].clamp_min(0)
    return probs.gather(-1, targets[..., None])[..., 0]


def test_two_models_give_the_direct_softmax_probabilities_tables_json_and_a_png(tmp_path, tiny_dir, sharpened):
    out = tmp_path / "out"
    analysis = token_probs.main(["--config", TINY, *data_args(tmp_path), "--model", "base=tiny:qwen2",
                                 "--model", f"sharp={sharpened}", "--out", str(out), "--min_count", "2",
                                 "--no_progress"])
    # the same loader, micro-batch by micro-batch: the probabilities match a plain softmax over the vocabulary
    datamodule = token_probs.build_datamodule([TINY], data_args(tmp_path))
    loader = list(token_probs.split_batches(datamodule, "train"))
    assert len(loader) == 3 and all(len(step) == 1 for step in loader)  # 8 rows, one micro-batch (3 rows) per item
    mb = loader[0][0]
    for label, model_dir in (("base", tiny_dir), ("sharp", sharpened)):
        probs, targets = token_probs.token_probabilities(token_probs.load_model(str(model_dir)), loader, progress=False)
        direct = direct_probabilities(model_dir, mb)
        mask = mb.target_mask
        first = int(mask.sum())
        np.testing.assert_allclose(probs[:first], direct[mask].numpy(), rtol=1e-5, atol=1e-9, err_msg=label)
        assert np.array_equal(targets[:first], mb.labels[:, 1:][mask].numpy())
        assert len(probs) == sum(int(s[0].target_mask.sum()) for s in loader) == analysis["data"]["tokens"]
        summary = next(m["summary"] for m in analysis["models"] if m["label"] == label)
        assert summary["count"] == len(probs)
        assert summary["mean"] == pytest.approx(float(probs.mean()), rel=1e-9)
        assert summary["quantiles"]["q50"] == pytest.approx(float(np.median(probs)), rel=1e-9)
        below = [b for b in summary["bins"] if b["range"] == [0.0, 1e-3]][0]
        assert below["count"] == int((probs < 1e-3).sum())
        assert sum(b["count"] for b in summary["bins"]) == sum(summary["histogram"]["counts"]) == len(probs)

    base, sharp = (next(m["summary"] for m in analysis["models"] if m["label"] == k) for k in ("base", "sharp"))
    assert base["bins"] != sharp["bins"]  # the sharpened model's distribution is another one
    moved = analysis["moved"][0]
    assert (moved["from"], moved["to"]) == ("base", "sharp") and moved["rose"] and moved["fell"]
    top = moved["rose"][0]
    assert top["count"] >= 2 and top["mean_change"] == pytest.approx(top["mean_after"] - top["mean_before"])
    assert all(a["mean_change"] >= b["mean_change"] for a, b in zip(moved["rose"], moved["rose"][1:], strict=False))

    saved = json.loads((out / "token_probs.json").read_text())
    assert saved["models"][1]["summary"]["quantiles"] == sharp["quantiles"]
    text = (out / "token_probs.md").read_text()
    assert "| base | " in text and "[0.9, 1]" in text and "rose most: base -> sharp" in text
    image = np.asarray(Image.open(out / "token_probs.png").convert("RGB")).astype(int)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 10
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two colours: one curve per model
        assert (np.abs(image - rgb).sum(-1) < 30).sum() > 200, rgb


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from instruments_common import run_main

    with pytest.raises(SystemExit):
        run_main(token_probs.main, ["--config", TINY, *data_args(tmp_path), "--model", str(tmp_path / "x.ckpt"),
                                    "--no_progress"])
    assert capsys.readouterr().err.strip().endswith("no such checkpoint file")
    with pytest.raises(SystemExit):
        run_main(token_probs.main, ["--config", TINY, *data_args(tmp_path), "--model", "tiny:qwen2",
                                    "--split", "nosuch", "--no_progress"])
    assert "--split nosuch: the data module has ['test', 'train', 'val']" in capsys.readouterr().err
