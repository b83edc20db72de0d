"""Image + text prompts for the generation engines (Qwen2-VL family placeholder scheme).

A multimodal prompt is a chat whose message ``content`` is a list of parts:
``{"type": "image", "image": ref}`` (``ref``: a ``PIL.Image``, raw ``bytes`` or a file path) and
``{"type": "text", "text": ...}`` — what ``MultimodalBenchmark.messages()`` returns. The chat template
renders each image part as one ``<|image_pad|>``; ``VisionPromptEncoder`` expands it to the number of
tokens the checkpoint's image processor gives that image (patches / ``merge_size**2``), exactly as
training does (``dft_lightning.data.vision``), and produces ``pixel_values`` / ``image_grid_thw``.

``HFEngine`` feeds the expanded ids and the pixels to ``generate``; ``VLLMEngine`` sends the
unexpanded ids with the images and lets vLLM's processor expand them.

Not handled here: videos, image URLs, checkpoints without an image processor or with another
placeholder scheme (a clear error names what is missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EncodedPrompt", "VisionPromptEncoder", "is_multimodal", "image_parts"]


def image_parts(prompt: Any) -> list[Any]:
    """The image references of a chat prompt, in order (``[]`` for text-only prompts)."""
    if isinstance(prompt, str) or not isinstance(prompt, Sequence):
        return []
    refs = []
    for message in prompt:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and (part.get("type") == "image" or "image" in part):
                    if part.get("image") is None:
                        raise ValueError("an image part has no 'image' reference (PIL image, bytes or path)")
                    refs.append(part["image"])
    return refs


def is_multimodal(prompt: Any) -> bool:
    return bool(image_parts(prompt))


@dataclass
class EncodedPrompt:
    """``ids``: token ids with each image's placeholder expanded; ``short_ids``: one placeholder per image."""

    ids: list[int]
    short_ids: list[int]
    images: list[Any]
    pixel_values: Any = None
    image_grid_thw: Any = None


def _template_messages(prompt: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The chat with image references replaced by ``{"type": "image"}`` (templates need no pixels)."""
    out = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if isinstance(p, Mapping) and (p.get("type") == "image" or "image" in p)
                       else dict(p) for p in content]
        out.append({**message, "content": content})
    return out


class VisionPromptEncoder:
    """Token ids and pixels of multimodal chat prompts for one checkpoint."""

    def __init__(self, tokenizer: Any, model_path: str, config: Any) -> None:
        from transformers import AutoImageProcessor

        self.tokenizer = tokenizer
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"{model_path}: no image placeholder token (config.image_token_id or <|image_pad|>)")
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{model_path}: no image processor for multimodal prompts: {e}") from None
        self.merge = int(getattr(self.image_processor, "merge_size", 2))

    def encode(self, prompt: Sequence[Mapping[str, Any]], index: int = 0, pixels: bool = True) -> EncodedPrompt:
        """``pixels=False``: images opened and placeholders counted, no image processor run (``ids`` unexpanded)."""
        from dft_lightning.evaluation.benchmarks.multimodal import load_image

        refs = image_parts(prompt)
        try:
            images = [load_image(ref).convert("RGB") for ref in refs]
        except (OSError, ValueError) as e:
            raise ValueError(f"prompt {index}: cannot open an image: {e}") from None
        text = self.tokenizer.apply_chat_template(_template_messages(prompt), tokenize=False,
                                                  add_generation_prompt=True)
        short = [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        placeholders = short.count(self.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"prompt {index}: the chat template wrote {placeholders} image placeholders for "
                             f"{len(images)} images; use the checkpoint's own vision-language chat template")
        if not pixels:
            return EncodedPrompt(short, short, images)
        out = self.image_processor(images=images, return_tensors="pt")
        counts = iter((out["image_grid_thw"].prod(-1) // self.merge**2).tolist())
        ids: list[int] = []
        for token in short:
            ids.extend([token] * next(counts) if token == self.image_token_id else [token])
        return EncodedPrompt(ids, short, images, out["pixel_values"], out["image_grid_thw"])
