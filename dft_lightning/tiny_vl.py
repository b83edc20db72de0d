"""A tiny random Qwen2.5-VL with its tokenizer and image processor, built offline for smoke tests.

``tiny_vl_dir()`` builds once (cached beside the tiny Qwen2, safe under concurrency) a directory
that ``transformers`` loads as a Qwen2.5-VL checkpoint:

- ``Qwen2_5_VLForConditionalGeneration`` from a config with a two-layer, 64-wide text decoder
  (multimodal rotary sections ``[2, 3, 3]``) and a two-block, 32-wide vision tower with the real
  patch geometry (patch 14, spatial merge 2, temporal patch 2), so each image token stands for
  2 x 2 patches as in the released models;
- the byte-level BPE tokenizer of ``tiny_model_dir("qwen2")`` extended with the Qwen2.5-VL vision
  special tokens (``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``,
  ``<|video_pad|>``) and a chat template in the Qwen2.5-VL layout: a message's ``content`` is a
  string or a list of parts, an ``{"type": "image"}`` part renders as
  ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad; the data side expands it);
- a ``Qwen2VLImageProcessor`` configuration with small pixel bounds (``MIN_PIXELS`` ..
  ``MAX_PIXELS``), so an image becomes 4 to 64 patches (1 to 16 image tokens).

The ``model.pretrained`` value ``tiny:qwen2_5_vl`` resolves to this directory. ``write_shapes``
generates a matching toy data set (coloured shapes, WeThink-like rows with image paths and embedded
bytes) for ``dft_lightning.data.vision.ShapesDataModule``.

Not handled here: videos (the tokens exist, no video processor is written), a ``processor_config``
(``AutoProcessor`` would also want a video processor, which needs torchvision: load the tokenizer
and ``AutoImageProcessor`` separately), anything meant to produce a useful model.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2  # one image token
MAX_PIXELS = 16 * (PATCH_SIZE * MERGE_SIZE) ** 2  # sixteen image tokens
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048, rope_theta=10000.0,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16: 8 rotary pairs (t, h, w)
)
VISION_CONFIG = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH_SIZE,
    spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, window_size=56,
    fullatt_block_indexes=[1],
)
VERSION = 1


def build_tiny_vl(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL, its tokenizer and its image processor config into ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLConfig

    from dft_lightning.tiny import tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS), strict=True))
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), **special, **TEXT_CONFIG},
        vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, **special,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    return out_dir


def image_processor():
    """The tiny model's Qwen2-VL image processor (PIL backend: no torchvision needed)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as processor
    except ImportError:  # transformers 4.x: the plain class is the PIL / numpy one
        from transformers import Qwen2VLImageProcessor as processor

    return processor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )


def tiny_vl_dir() -> Path:
    """The cached tiny Qwen2.5-VL directory, built on first use."""
    from dft_lightning.paths import atomic_dir, cache_root

    target = cache_root() / "tiny" / f"qwen2_5_vl-v{VERSION}"
    with atomic_dir(target) as tmp:
        if tmp is not None:
            build_tiny_vl(tmp)
    return target


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, size: tuple[int, int]) -> Any:
    """A PIL image of one filled shape on a light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (245, 245, 240))
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


def write_shapes(root: Path, split: str, n: int, seed: int) -> Path:
    """Write ``<split>.jsonl`` and its PNG images under ``root``: every third row embeds its image as
    base64 bytes, every fourth has two images."""
    rng = random.Random(f"{seed}-{split}")
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        picks = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(2 if i % 4 == 3 else 1)]
        images: list[Any] = []
        for j, (shape, colour) in enumerate(picks):
            image = draw_shape(shape, colour, (rng.randint(28, 120), rng.randint(28, 120)))
            if i % 3 == 2:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                images.append({"bytes": base64.b64encode(buffer.getvalue()).decode()})
            else:
                name = f"images/{split}-{i}-{j}.png"
                image.save(root / name)
                images.append(name)
        if len(picks) == 1:
            question = "What shape is in the picture, and what colour is it?"
            thing = f"{picks[0][1]} {picks[0][0]}"
            answer = f"The picture shows a {thing}. The answer is \\boxed{{{thing}}}."
        else:
            question = "Describe the shape in each picture."
            answer = (f"The first picture shows a {picks[0][1]} {picks[0][0]} and the second a "
                      f"{picks[1][1]} {picks[1][0]}.")
        lines.append(json.dumps({"images": images, "question": question, "response": answer}))
    path = root / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
