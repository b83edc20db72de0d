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
    """``ids``: token ids with each image's placeholder expanded; ``short_ids``: one placeholder per image.

    A *deferred* prompt (``source`` set, from ``VisionPromptEncoder.defer``) has checked ids but no pixels
    yet: ``VisionPromptEncoder.encode(source, index)`` makes them when its batch is generated, so a whole
    benchmark's images are never decoded into memory at once.
    """

    ids: list[int]
    short_ids: list[int]
    images: list[Any]
    pixel_values: Any = None
    image_grid_thw: Any = None
    source: Any = None
    index: int = 0


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

    def short_ids(self, prompt: Sequence[Mapping[str, Any]], index: int = 0) -> list[int]:
        """The chat's token ids with one placeholder per image part (checked); no image is opened."""
        text = self.tokenizer.apply_chat_template(_template_messages(prompt), tokenize=False,
                                                  add_generation_prompt=True)
        short = [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        placeholders, images = short.count(self.image_token_id), len(image_parts(prompt))
        if placeholders != images:
            raise ValueError(f"prompt {index}: the chat template wrote {placeholders} image placeholders for "
                             f"{images} images; use the checkpoint's own vision-language chat template")
        return short

    def defer(self, prompt: Sequence[Mapping[str, Any]], index: int = 0) -> EncodedPrompt:
        """A checked prompt whose pixels are made later (``encode``)."""
        short = self.short_ids(prompt, index)
        return EncodedPrompt(short, short, [], source=prompt, index=index)

    def open_images(self, prompt: Sequence[Mapping[str, Any]], index: int = 0) -> list[Any]:
        from dft_lightning.evaluation.benchmarks.multimodal import load_image

        try:
            return [load_image(ref).convert("RGB") for ref in image_parts(prompt)]
        except (OSError, ValueError) as e:
            raise ValueError(f"prompt {index}: cannot open an image: {e}") from None

    def encode(self, prompt: Sequence[Mapping[str, Any]], index: int = 0) -> EncodedPrompt:
        """Ids with each placeholder expanded to its image's token count, and the pixels."""
        short = self.short_ids(prompt, index)
        images = self.open_images(prompt, index)
        out = self.image_processor(images=images, return_tensors="pt")
        counts = iter((out["image_grid_thw"].prod(-1) // self.merge**2).tolist())
        ids: list[int] = []
        for token in short:
            ids.extend([token] * next(counts) if token == self.image_token_id else [token])
        return EncodedPrompt(ids, short, images, out["pixel_values"], out["image_grid_thw"])
