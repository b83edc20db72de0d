"""VisionDataModule: image rows become exactly-supervised Qwen2.5-VL chats; every bad row is counted."""

from __future__ import annotations

import base64
import io
from collections import Counter

import pytest
import torch

from dft_lightning.data.vision import VisionDataModule, VisionFields, open_image
from dft_lightning.errors import DataError
from tests.conftest import write_rows

TINY_VL = "tiny:qwen2_5_vl"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Fixture images: two PNG files, one JPEG, one as base64 bytes, one corrupt, one truncated, one too thin."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (60, 40), (200, 20, 20)).save(root / "red.png")
    Image.new("RGB", (90, 120), (20, 20, 200)).save(root / "blue.png")
    Image.new("RGB", (200, 150), (20, 160, 20)).save(root / "green.jpg", quality=90)
    buffer = io.BytesIO()
    Image.new("RGBA", (30, 70), (250, 250, 0, 128)).save(buffer, format="PNG")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    full = (root / "blue.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.new("RGB", (600, 2), (0, 0, 0)).save(root / "thin.png")
    return {"root": root, "bytes": base64.b64encode(buffer.getvalue()).decode()}


@pytest.fixture(scope="module")
def vl_dir():
    from dft_lightning.tiny_vl import tiny_vl_dir

    return tiny_vl_dir()


def make_module(train, **kwargs):
    kwargs.setdefault("batch_size", 1)
    return VisionDataModule(train=str(train), tokenizer=TINY_VL, **kwargs)


def by_line(dm, split="train"):
    return {int(r["row_id"].rsplit(":", 1)[1]): r for r in dm.datasets[split]}


def expected_row(dm, messages, sources):
    """Independent expectation: render, expand each pad by the processor's count, tokenise, then
    supervise the tokens from after each ``<|im_start|>assistant\\n`` through its ``<|im_end|>``."""
    tok = dm.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False).rstrip()
    grids = dm.image_processor(images=[open_image(s) for s in sources], return_tensors="pt")["image_grid_thw"]
    counts = (grids.prod(-1) // 4).tolist()
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(counts) + 1
    expanded = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:], strict=True))
    ids = tok(expanded, add_special_tokens=False)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for i, t in enumerate(ids):
        if t != start:
            continue
        k = next(j for j in range(i + 1, len(ids)) if ids[j : j + len(newline)] == newline)
        if tok.decode(ids[i + 1 : k]) == "assistant":
            stop = ids.index(end, k)
            labels[k + len(newline) : stop + 1] = ids[k + len(newline) : stop + 1]
    return ids, labels, counts


def test_assistant_tokens_exactly_are_supervised_and_image_tokens_never(tmp_path, images):
    root = images["root"]
    rows = [
        {"images": ["red.png"], "question": "What colour is it?", "response": "It is red."},
        {"image": {"bytes": images["bytes"]}, "problem": "Describe the picture.", "answer": "A yellow box."},
        {"images": [str(root / "green.jpg"), "blue.png"], "question": "Compare <image> with <image>, please.",
         "response": "The first is green, the second blue."},
        {"images": ["blue.png"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A rectangle."}]},
    ]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows), image_root=str(root))
    dm.setup("fit")
    assert (dm.reports["train"].read, dm.reports["train"].kept) == (4, 4), dm.reports["train"].summary()
    kept = by_line(dm)
    blue, green = str(root / "blue.png"), str(root / "green.jpg")
    chats = {
        1: ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
             {"role": "assistant", "content": "It is red."}], [str(root / "red.png")], ["It is red."]),
        2: ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
             {"role": "assistant", "content": "A yellow box."}], [{"bytes": images["bytes"]}], ["A yellow box."]),
        3: ([{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                          {"type": "text", "text": " with "}, {"type": "image"},
                                          {"type": "text", "text": ", please."}]},
             {"role": "assistant", "content": "The first is green, the second blue."}], [green, blue],
            ["The first is green, the second blue."]),
        4: ([{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Shape?"},
             {"role": "assistant", "content": "A rectangle."}], [blue], ["Blue.", "A rectangle."]),
    }
    image_id = dm.image_token_id
    vision = set(dm.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]))
    for line, (messages, sources, answers) in chats.items():
        row = kept[line]
        ids, labels, counts = expected_row(dm, messages, sources)
        assert row["input_ids"] == ids, line
        assert row["labels"] == labels, line  # token by token
        assert row["image_tokens"] == counts and row["input_ids"].count(image_id) == sum(counts)
        assert all(lab == -100 for t, lab in zip(row["input_ids"], row["labels"], strict=True) if t in vision)
        supervised = dm.tokenizer.decode([t for t in row["labels"] if t != -100])
        assert supervised == "<|im_end|>".join(answers) + "<|im_end|>"
    assert [c for c in kept[3]["image_tokens"]] == [12, 12]  # 200x150 and 90x120 at <= 16 tokens each


def test_micro_batch_carries_each_rows_patches_in_order(tmp_path, images):
    rows = [{"images": ["red.png"], "question": "Colour?", "response": "Red."},
            {"images": ["green.jpg", "blue.png"], "question": "Colours?", "response": "Green, then blue."},
            {"images": [{"bytes": images["bytes"]}], "question": "Colour?", "response": "Yellow."}]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows), image_root=str(images["root"]), batch_size=3,
                     micro_batch_size=2)
    dm.setup("fit")
    (step,) = list(dm.train_dataloader())
    assert len(step) == 2 and step[0].position_ids is None
    processor = dm.image_processor
    for mb in step:
        rows_here = [next(r for r in dm.datasets["train"] if r["row_id"] == rid) for rid in mb.row_ids]
        expected = processor(images=[open_image(s) for r in rows_here for s in r["images"]], return_tensors="pt")
        extra = mb.extra_inputs
        torch.testing.assert_close(extra["pixel_values"], expected["pixel_values"])
        assert torch.equal(extra["image_grid_thw"], expected["image_grid_thw"])
        assert torch.equal(extra["mm_token_type_ids"], (mb.input_ids == dm.image_token_id).int())
        n_tokens = int((mb.input_ids == dm.image_token_id).sum())
        assert n_tokens == int(extra["image_grid_thw"].prod(-1).sum()) // 4
        widths = [len(r["input_ids"]) for r in rows_here]
        assert mb.input_ids.shape[1] == max(widths) and widths == sorted(widths, reverse=True)


def test_every_bad_row_kind_is_counted(tmp_path, images):
    root = images["root"]
    good = {"images": ["red.png"], "question": "Colour?", "response": "Red."}
    rows = [
        good,
        {**good, "images": ["https://example.com/cat.png"]},  # bad_image: URL, offline
        {**good, "images": ["corrupt.png"]},  # bad_image: corrupt
        {**good, "images": ["truncated.png"]},  # bad_image: truncated file
        {**good, "images": ["nowhere.png"]},  # bad_image: missing
        {**good, "images": [{"bytes": "not base64 !"}]},  # bad_image: bad embedded bytes
        {**good, "images": ["thin.png"]},  # bad_image: aspect ratio the processor rejects
        {**good, "images": []},  # no_image
        {**good, "question": "<image> vs <image>?"},  # image_mismatch: 2 markers, 1 image
        {**good, "question": "What is <|image_pad|>?"},  # image_mismatch: a placeholder in the text
        {"images": ["red.png"], "response": "Red."},  # missing_field
        {**good, "question": 3},  # bad_type
        {**good, "question": "  "},  # empty_prompt
        {**good, "response": ""},  # empty_response
        {**good, "response": "red " * 400},  # overlong
        {"images": ["red.png"], "messages": [{"role": "robot", "content": "hi"}]},  # bad_role
        {"images": ["red.png"], "messages": [{"role": "user", "content": ["x"]}]},  # bad_messages
        {**good, "images": ["blue.png"]},
    ]
    path = write_rows(tmp_path / "train.jsonl", rows, extra_lines=['{"images": ["red.png"', "[1, 2]"])
    dm = make_module(path, image_root=str(root), max_length=200)
    dm.setup("fit")
    report = dm.reports["train"]
    assert report.read == len(rows) + 2 and report.kept == 2
    assert report.dropped == Counter({
        "bad_image": 6, "no_image": 1, "image_mismatch": 2, "missing_field": 1, "bad_type": 1, "empty_prompt": 1,
        "empty_response": 1, "overlong": 1, "bad_role": 1, "bad_messages": 1, "malformed_json": 1,
        "not_an_object": 1,
    })
    assert report.examples["bad_image"][:3] == ["train.jsonl:2", "train.jsonl:3", "train.jsonl:4"]
    assert "not downloaded" in report.details["bad_image"]
    assert "https://example.com/cat.png" in report.details["bad_image"]
    assert "dropped bad_image: 6" in report.summary()


@pytest.mark.parametrize(("image", "detail"), [
    ("https://example.com/cat.png", "URL images are not downloaded"), ("corrupt.png", "cannot decode"),
    ("truncated.png", "cannot decode"), ("nowhere.png", "image file not found"),
])
def test_strict_names_the_row_and_the_image_problem(tmp_path, images, image, detail):
    rows = [{"images": ["red.png"], "question": "Colour?", "response": "Red."},
            {"images": [image], "question": "Colour?", "response": "Red."}]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows), image_root=str(images["root"]), strict=True)
    with pytest.raises(DataError, match=rf"row train.jsonl:2 dropped: bad_image \(.*{detail}"):
        dm.setup("fit")


def test_header_only_check_defers_corrupt_pixels_to_loading(tmp_path, images):
    rows = [{"images": ["truncated.png"], "question": "Colour?", "response": "Blue."}]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows), image_root=str(images["root"]), verify_images=False)
    dm.setup("fit")
    assert dm.reports["train"].kept == 1
    with pytest.raises(DataError, match="row train.jsonl:1: cannot decode"):
        next(iter(dm.train_dataloader()))


def test_truncation_keeps_images_whole(tmp_path, images):
    rows = [{"images": ["red.png"], "question": "Colour?", "response": "red " * 100},
            {"images": ["red.png"], "question": "word " * 150 + "<image>", "response": "Red."}]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows), image_root=str(images["root"]), max_length=64,
                     overlong="truncate")
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.kept, report.truncated, report.dropped["overlong"]) == (1, 1, 1)
    assert "would cut an image" in report.details["overlong"]
    (row,) = dm.datasets["train"]
    assert len(row["input_ids"]) == 64 and row["input_ids"].count(dm.image_token_id) == row["image_tokens"][0]


def test_images_relative_to_the_data_file_and_configurable_fields(tmp_path, images):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "pics" / "a.png")
    rows = [{"img": "pics/a.png", "q": "Colour?", "reasoning": "It looks dark.", "final": "black"}]
    dm = make_module(write_rows(tmp_path / "train.jsonl", rows),
                     fields=VisionFields(images="img", question="q"),
                     response_template="<think>{reasoning}</think> {final}")
    dm.setup("fit")
    (row,) = dm.datasets["train"]
    assert row["images"] == [str(tmp_path / "pics" / "a.png")] and row["image_tokens"] == [4]
    supervised = dm.tokenizer.decode([t for t in row["labels"] if t != -100])
    assert supervised == "<think>It looks dark.</think> black<|im_end|>"


def test_configuration_errors_are_clear(tmp_path, tiny_dir, images):
    with pytest.raises(DataError, match="packing is not supported with images"):
        VisionDataModule(train="x.jsonl", packing=True)
    rows = [{"images": ["red.png"], "question": "Colour?", "response": "Red."}]
    path = write_rows(tmp_path / "train.jsonl", rows)
    text_only = VisionDataModule(train=str(path), tokenizer=str(tiny_dir), image_root=str(images["root"]),
                                 batch_size=1)
    with pytest.raises(DataError, match="chat template"):
        text_only.setup("fit")
    missing = write_rows(tmp_path / "missing.jsonl", [{"images": ["red.png"], "answer": "Red."}] * 3)
    with pytest.raises(DataError, match="missing in all 3 rows"):
        make_module(missing, image_root=str(images["root"])).setup("fit")
