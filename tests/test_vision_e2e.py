"""The tiny random Qwen2.5-VL trains through the same objectives: model plumbing, then the CLI end to end."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, series

TINY_VL_CONF = str(REPO / "conf" / "tiny_vl.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from dft_lightning.data.vision import ShapesDataModule

    dm = ShapesDataModule(data_dir=str(tmp_path_factory.mktemp("shapes")), tokenizer="tiny:qwen2_5_vl", num_train=8,
                          num_test=4, batch_size=8, micro_batch_size=4)
    dm.setup("fit")
    return dm


def stats(model, mb):
    return model(mb)["logp"]


def test_decoder_head_and_images_reach_the_loss(shapes):
    from dft_lightning.modeling import CausalLMWithTokenStats, load_causal_lm

    lm = load_causal_lm("tiny:qwen2_5_vl")
    assert type(lm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    model = CausalLMWithTokenStats(lm).eval()
    assert type(model.decoder()).__name__ == "Qwen2_5_VLModel" and model.head() is lm.lm_head
    collate = shapes.train_dataloader().collate_fn
    dataset = shapes.train_dataloader().dataset
    rows = [dataset[i] for i in range(4)]
    (batch,) = collate(rows)
    with torch.no_grad():
        batched = stats(model, batch)
        assert torch.isfinite(batched).all()
        assert (lm.model.rope_deltas != 0).all()  # 3-D rotary positions: image tokens share positions
        assert batch.position_ids is None  # the model builds its 3-D rotary positions itself
        for i, row_id in enumerate(batch.row_ids):  # patches of each row are where the model expects them
            (single,) = collate([next(r for r in rows if r["row_id"] == row_id)])
            n = single.input_ids.shape[1] - 1
            torch.testing.assert_close(batched[i, :n], stats(model, single)[0], rtol=1e-4, atol=1e-4)
        other = dataclasses.replace(batch, extra_inputs={
            **batch.extra_inputs, "pixel_values": batch.extra_inputs["pixel_values"].flip(0)})
        mask = batch.target_mask
        assert not torch.allclose(batched[mask], stats(model, other)[mask])  # the pixels matter


def test_freeze_vision_tower_freezes_exactly_the_visual_params():
    from dft_lightning.modeling import freeze_vision_tower, load_causal_lm

    lm = load_causal_lm("tiny:qwen2_5_vl")
    visual = {n for n, _ in lm.named_parameters() if n.startswith("model.visual.")}
    assert freeze_vision_tower(lm) == len(visual) > 0
    assert {n for n, p in lm.named_parameters() if not p.requires_grad} == visual


def fit(tmp_path, *extra):
    result = run_cli(["fit", "--config", TINY_VL_CONF, f"--trainer.default_root_dir={tmp_path}",
                      f"--data.init_args.data_dir={tmp_path / 'data'}", "--trainer.max_steps=2",
                      "--export.at_end=true", *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def changed_tensors(tmp_path):
    """``(visual, language)``: which tensors of each part moved, from the start to the export."""
    from transformers import AutoModelForImageTextToText

    from dft_lightning.tiny_vl import tiny_vl_dir

    start = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir()).state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(next(tmp_path.rglob("hf/final"))).state_dict()
    assert start.keys() == trained.keys()
    moved = {k: not torch.equal(start[k], trained[k]) for k in start}
    visual = [v for k, v in moved.items() if k.startswith("model.visual.")]
    language = [v for k, v in moved.items() if not k.startswith("model.visual.")]
    assert visual and language
    return visual, language


@pytest.mark.slow
def test_tiny_vl_trains_with_dft_through_the_cli(tmp_path):
    fit(tmp_path)
    rows = read_metrics(tmp_path)
    loss, nll = series(rows, "train/loss"), series(rows, "train/nll")
    assert len(loss) == 2 and all(math.isfinite(v) for v in loss + nll)
    assert all(a < b / 10 for a, b in zip(loss, nll, strict=True))  # DFT: p ~ 1/V at the start
    assert series(rows, "dft/weight_mean") and series(rows, "train/grad_norm")[0] > 0
    visual, language = changed_tensors(tmp_path)
    assert all(visual) and all(language)
    # the export is a complete vision-language checkpoint: image prompts generate from it
    from dft_lightning.evaluation.engines import HFEngine, SamplingParams
    from dft_lightning.tiny_vl import draw_shape

    export = next(tmp_path.rglob("hf/final"))
    assert (export / "preprocessor_config.json").is_file()
    prompt = [{"role": "user", "content": [{"type": "image", "image": draw_shape("circle", "red", (40, 40))},
                                           {"type": "text", "text": "Which shape?"}]}]
    [[completion]] = HFEngine(export).generate_completions([prompt], SamplingParams(n=1, temperature=0, max_tokens=4))
    assert completion.token_ids


@pytest.mark.slow
def test_freeze_vision_keeps_the_vision_tower_unchanged_and_the_export_keeps_the_trained_pixel_bounds(tmp_path):
    from transformers import AutoImageProcessor

    from dft_lightning.tiny_vl import MAX_PIXELS, MIN_PIXELS

    bound = MAX_PIXELS // 4
    fit(tmp_path, "--model.freeze_vision=true", f"--data.init_args.max_pixels={bound}")
    assert all(math.isfinite(v) for v in series(read_metrics(tmp_path), "train/loss"))
    visual, language = changed_tensors(tmp_path)
    assert not any(visual) and all(language)
    exported = AutoImageProcessor.from_pretrained(next(tmp_path.rglob("hf/final")))
    assert (exported.size["longest_edge"], exported.size["shortest_edge"]) == (bound, MIN_PIXELS)
