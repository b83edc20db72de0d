"""Image + text prompts: placeholder expansion, HFEngine generation with pixels, the vLLM protocol, and
``evaluate_model`` on a multimodal benchmark end to end (tiny random Qwen2.5-VL, built offline)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dft_lightning.evaluation.engines import HFEngine, SamplingParams
from dft_lightning.evaluation.run import BenchmarkSpec, EngineSpec, Sampling, evaluate_model
from dft_lightning.evaluation.vision_inputs import VisionPromptEncoder, image_parts
from dft_lightning.tiny_vl import draw_shape
from tests.evaluation.test_engines import fake_vllm  # noqa: F401 - fixture
from tests.evaluation.test_run import AnswerKey


@pytest.fixture(scope="module")
def vl_dir():
    from dft_lightning.tiny_vl import tiny_vl_dir

    return tiny_vl_dir()


def chat(*images, text="What is shown?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def test_placeholders_expand_to_the_image_processors_token_count(vl_dir, tmp_path):
    from transformers import AutoConfig

    from dft_lightning.pretrained import load_tokenizer

    small, large = draw_shape("circle", "red", (30, 40)), draw_shape("square", "blue", (112, 90))
    path = tmp_path / "large.png"
    large.save(path)
    encoder = VisionPromptEncoder(load_tokenizer(str(vl_dir)), str(vl_dir), AutoConfig.from_pretrained(vl_dir))
    encoded = encoder.encode(chat(small, str(path)))  # a PIL image and a file path
    pad = encoder.image_token_id
    per_image = (encoded.image_grid_thw.prod(-1) // 4).tolist()
    assert len(per_image) == 2 and per_image[0] < per_image[1]  # sizes differ, so do the counts
    assert encoded.short_ids.count(pad) == 2 and encoded.ids.count(pad) == sum(per_image)
    assert [t for t in encoded.ids if t != pad] == [t for t in encoded.short_ids if t != pad]
    assert encoded.pixel_values.shape[0] == int(encoded.image_grid_thw.prod(-1).sum())
    with pytest.raises(ValueError, match="prompt 3: cannot open an image"):
        encoder.encode(chat(str(tmp_path / "missing.png")), index=3)
    with pytest.raises(ValueError, match="no 'image' reference"):
        image_parts([{"role": "user", "content": [{"type": "image"}]}])


def test_hf_engine_batches_images_as_single_prompts_do(vl_dir):
    """Left padding and the rows' pixels in row order: a batch of differently sized images (and a text-only
    prompt) generates exactly what each prompt generates alone."""
    prompts = [chat(draw_shape("circle", "red", (30, 40))),
               chat(draw_shape("triangle", "green", (112, 112)), draw_shape("square", "blue", (60, 30))),
               [{"role": "user", "content": "No picture here."}]]
    params = SamplingParams(n=1, temperature=0, max_tokens=6)
    engine = HFEngine(vl_dir, batch_size=8)
    batched = engine.generate_completions(prompts, params)
    alone = [engine.generate_completions([p], params)[0] for p in prompts]
    assert [b[0].token_ids for b in batched] == [a[0].token_ids for a in alone]
    assert all(len(b[0].token_ids) > 0 for b in batched)


def test_hf_engine_output_depends_on_the_pixels(vl_dir):
    """The image really reaches the model: the first generated token's scores change with the picture."""
    engine = HFEngine(vl_dir, batch_size=8)
    scores = []
    for image in (draw_shape("circle", "red", (56, 56)), draw_shape("square", "blue", (56, 56))):
        [deferred] = engine._encode([chat(image)])
        assert deferred.pixel_values is None and deferred.source is not None  # pixels only when its batch runs
        encoded = engine._vision_encoder.encode(deferred.source, deferred.index)
        ids = torch.tensor([encoded.ids])
        with torch.no_grad():
            out = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=encoded.pixel_values, image_grid_thw=encoded.image_grid_thw)
        scores.append(out.logits[0, -1])
    assert not torch.allclose(scores[0], scores[1])


def test_text_only_model_rejects_images(tiny_dir):
    engine = HFEngine(tiny_dir)
    with pytest.raises(ValueError, match="prompt 1 has images but .* is a text-only model"):
        engine.generate([[{"role": "user", "content": "hi"}], chat(draw_shape("circle", "red", (30, 30)))],
                        SamplingParams(n=1, temperature=0, max_tokens=2))


def test_vllm_receives_unexpanded_ids_and_the_images(fake_vllm, vl_dir):  # noqa: F811
    from dft_lightning.pretrained import load_tokenizer

    engine = fake_vllm(vl_dir)
    images = [draw_shape("circle", "red", (30, 40)), draw_shape("square", "blue", (50, 20))]
    prompts = [chat(*images), [{"role": "user", "content": "text only"}]]
    [with_images, text_only] = engine.generate_completions(prompts, SamplingParams(n=1, temperature=0, max_tokens=2))
    info = json.loads(with_images[0].text)
    assert info["images"] == [[list(im.size), list(im.getpixel((im.width // 2, im.height // 2)))] for im in images]
    assert info["kwargs"]["limit_mm_per_prompt"] == {"image": 2}
    tokenizer = load_tokenizer(str(vl_dir))
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert list(reversed(with_images[0].token_ids)).count(pad) == 2  # one placeholder per image
    assert json.loads(text_only[0].text)["images"] is None


def test_evaluate_a_multimodal_benchmark_end_to_end(vl_dir, tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
        draw_shape(shape, colour, (40 + 20 * i, 50)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": i, "question": "Which shape is shown?", "options": ["circle", "square", "triangle"],
                     "image": f"img/{i}.png", "answer": "ABC"[i], "subject": "shapes", "level": 1})
    source = tmp_path / "mathvision_test.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    metrics = evaluate_model(str(vl_dir), [BenchmarkSpec(name="mathvision", source=str(source))],
                             EngineSpec(kind="hf", batch_size=4), Sampling(n=2, max_tokens=5, seed=1),
                             output_dir=str(out))
    assert set(metrics) >= {"eval/mathvision/avg@2", "eval/mathvision/pass@2", "eval/mean/avg"}
    assert 0.0 <= metrics["eval/mathvision/avg@2"] <= 1.0
    lines = [json.loads(line) for line in (out / "mathvision.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["mathvision/0", "mathvision/1", "mathvision/2"]
    assert [r["answer"] for r in lines] == ["A", "B", "C"]
    assert all(len(r["completions"]) == 2 and len(r["correct"]) == 2 for r in lines)
    assert json.loads((out / "summary.json").read_text())["totals"]["mathvision"]["problems"] == 3


def test_group_breakdown_is_reported_and_adds_up_across_shards(tmp_path):
    from dft_lightning.evaluation.run import breakdown_from_totals, combine_totals

    draw_shape("circle", "red", (30, 30)).save(tmp_path / "0.png")
    subjects, levels, answers, rows = ["angle", "angle", "area", "area"], [1, 2, 1, 2], {}, []
    for i in range(4):
        question = f"Question {i}: which option?"
        rows.append({"id": i, "question": question, "options": ["1", "2", "3"], "image": "0.png", "answer": "B",
                     "subject": subjects[i], "level": levels[i]})
        answers[question] = "\\boxed{B}" if i < 3 else "\\boxed{C}"  # the last one is wrong
    source = tmp_path / "mathvision_test.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = [BenchmarkSpec(name="mathvision", source=str(source))]
    evaluate_model("unused", spec, AnswerKey(answers), Sampling(n=2), output_dir=str(tmp_path / "all"))
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    groups = summary["breakdown"]["mathvision"]
    assert groups["subject=angle"] == {"problems": 2, "avg@2": 1.0, "pass@2": 1.0}
    assert groups["subject=area"]["avg@2"] == 0.5 and groups["level=2"]["avg@2"] == 0.5
    assert groups["level=1"]["avg@2"] == 1.0 and groups["question_type=multiple_choice"]["problems"] == 4
    parts = []
    for index in range(3):  # uneven shards; a shard may miss a group entirely
        out = tmp_path / f"shard-{index}"
        evaluate_model("unused", spec, AnswerKey(answers), Sampling(n=2), output_dir=str(out), shard=(index, 3))
        parts.append(json.loads((out / "summary.json").read_text())["totals"])
    assert breakdown_from_totals(combine_totals(parts)) == summary["breakdown"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
