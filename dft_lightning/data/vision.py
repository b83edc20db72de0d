"""``VisionDataModule``: image + question + answer rows (WeThink-style) as supervised Qwen2.5-VL chats.

A raw row has one or more images and either a question and a response (``fields``: each unset name
falls back to candidates, the first present in a row winning: images ``images`` / ``image`` /
``image_path`` / ``image_paths``, question ``question`` / ``problem`` / ``prompt`` / ``query``,
response ``response`` / ``answer`` / ``solution``), or a ``messages`` list of chat turns with string
contents. ``response_template`` builds the response from several row fields instead (e.g.
``"{reasoning}\\n\\nAnswer: {answer}"``). An image is a local path (relative paths resolve against
``image_root``, default: the data file's directory), a ``{"bytes": ...}`` / ``{"path": ...}`` dict
(parquet image columns; bytes may be base64 text in JSON), raw bytes, a ``data:`` URI or a decoded
PIL image (hub datasets with an image feature). ``image_marker`` (``<image>``) in the text places
an image; without markers the images open the first user turn, as in the Qwen2.5-VL examples.

Encoding: the chat (image parts as ``{"type": "image"}``) is rendered by the tokenizer's chat
template, which writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image, and supervised
by ``ChatEncoder`` exactly as text chats are (assistant turns only). Each ``<|image_pad|>`` is then
expanded, in token space, to the number of tokens the image processor gives that image
(``patches / spatial_merge_size**2``), the same count Qwen2.5-VL's processor writes. Labels of
vision tokens (start, end, pads) are always ignored. The image token count is computed at setup
from the image size; pixels are produced when a row is loaded (``VisionStepDataset``), so a large
data set is never held in memory as patches, and the count is checked against the processor again.

Batching: rows are length-grouped and padded as in ``pad_rows``; a micro-batch's ``extra_inputs``
hold ``pixel_values`` (the rows' patches concatenated in row order), ``image_grid_thw`` and, when
the model's forward takes it, ``mm_token_type_ids``. ``position_ids`` are left out: the model builds
its 3-D rotary positions (time, height, width for image tokens) from these.

Drops, counted by reason: ``bad_image`` (missing or unreadable file, corrupt data, invalid base64,
a size the processor rejects, a URL: nothing is downloaded), ``no_image`` (with ``require_image``),
``image_mismatch`` (markers or placeholder tokens in the text do not match the images),
``missing_field``, ``bad_type``, ``bad_messages``, ``bad_role``, ``not_an_object``,
``empty_prompt``, ``empty_response``, ``overlong`` (also when truncation would cut an image), plus
the base class's ``malformed_json``.

``ShapesDataModule`` generates a small synthetic set (coloured shapes, one or two images per row,
paths and embedded bytes) for smoke tests and ``conf/tiny_vl.yaml``.

Not handled here: videos, packing (``packing: true`` raises), fetching images by URL, EXIF
orientation (images are used as stored), models other than the Qwen2-VL family's placeholder scheme,
caching the setup pass (every image is opened once per run; ``verify_images: false`` reads headers
only). Hub rows with decoded images stay in memory as the base class reads all raw rows. Text-only
micro-batches (``require_image: false``) leave the vision tower without gradients, which DDP reports
unless ``find_unused_parameters`` is on.
"""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from dft_lightning.batch import MicroBatch
from dft_lightning.data.batching import StepBatchSampler, StepDataset, pad_rows
from dft_lightning.data.chat import IGNORE_INDEX, ChatEncoder, DataReport, DropRow, FieldMap, to_messages
from dft_lightning.data.module import ChatDataModule
from dft_lightning.data.workers import guarded_loader
from dft_lightning.errors import DataError
from dft_lightning.rows import looks_local

URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")
VISION_TOKEN_NAMES = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass
class VisionFields:
    """Row fields of a vision source; ``None`` uses the candidates in the module docstring."""

    images: str | None = None
    question: str | None = None
    response: str | None = None
    messages: str = "messages"


CANDIDATES = {
    "images": ("images", "image", "image_path", "image_paths"),
    "question": ("question", "problem", "prompt", "query"),
    "response": ("response", "answer", "solution"),
}


def open_image(source: Any, *, verify: bool = True) -> Any:
    """A PIL image from a path, bytes, ``{"bytes"|"path": ...}``, ``data:`` URI or PIL image.

    Raises ``DropRow("bad_image")`` with the cause. ``verify`` decodes the pixels (corrupt data is
    found now); otherwise only the header is read.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            source = source["bytes"]
            if isinstance(source, str):
                source = _b64(source, "the 'bytes' text of an image")
        elif source.get("path") or source.get("url") or source.get("image_url"):
            source = source.get("path") or source.get("url") or source.get("image_url")
        else:
            raise DropRow("bad_image", f"image dict without 'bytes' or 'path' (keys: {', '.join(sorted(source))})")
    what = "embedded image"
    if isinstance(source, str):
        if source.startswith(URL_PREFIXES):
            raise DropRow("bad_image", f"URL images are not downloaded (no network access): {source[:100]}; "
                                       "download them and give local paths")
        if source.startswith("data:"):
            source = _b64(source.partition(",")[2], "a data: URI")
        else:
            path = Path(source.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise DropRow("bad_image", f"image file not found: {path}")
            what, source = str(path), path
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    elif not isinstance(source, Path):
        raise DropRow("bad_image", f"cannot read an image from a {type(source).__name__}")
    try:
        image = Image.open(source)
        if verify:
            image.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the image unusable
        raise DropRow("bad_image", f"cannot decode {what}: {type(e).__name__}: {e}") from None
    return image


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise DropRow("bad_image", f"{what} is not valid base64") from None


def _resolve(source: Any, root: Path) -> Any:
    """Make a relative path (a string or a dict's ``path``) absolute against ``root``; others pass through."""
    if isinstance(source, dict) and source.get("bytes") is None and isinstance(source.get("path"), str):
        source = source["path"]
    if isinstance(source, str) and not source.startswith((*URL_PREFIXES, "data:", "/", "~", "file://")):
        return str(root / source)
    return source


class VisionStepDataset(StepDataset):
    """Tokenised vision rows; loading a row opens its images and runs the image processor."""

    def __init__(self, rows: list[dict[str, Any]], image_processor: Any, merge: int) -> None:
        super().__init__(rows)
        self.image_processor, self.merge = image_processor, merge

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = super().__getitem__(index)
        if not row.get("images"):
            return row
        name = self.rows[index if index >= 0 else -index - 1]["row_id"]
        try:
            images = [open_image(s) for s in row["images"]]
        except DropRow as e:
            raise DataError(f"row {name}: {e.detail}") from None
        out = self.image_processor(images=images, return_tensors="pt")
        for image, source in zip(images, row["images"], strict=True):
            if image is not source:
                image.close()
        tokens = (out["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        if tokens != row["image_tokens"]:
            raise DataError(f"row {name}: the image processor gives {tokens} image tokens, setup counted "
                            f"{row['image_tokens']}; the images or the processor settings changed")
        return {**row, "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


class VisionStepCollator:
    """One step's rows -> padded micro-batches with the images' patches in ``extra_inputs``."""

    def __init__(self, micro_batch_size: int, pad_id: int, image_token_id: int, video_token_id: int | None,
                 token_type_ids: bool) -> None:
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.image_token_id, self.video_token_id, self.token_type_ids = image_token_id, video_token_id, token_type_ids

    def micro_batch(self, rows: list[dict[str, Any]]) -> MicroBatch:
        batch = pad_rows(rows, self.pad_id, positions=False)  # the model builds 3-D rotary positions itself
        with_images = [r for r in rows if r.get("image_grid_thw") is not None]
        if with_images:
            extra = {"pixel_values": torch.cat([r["pixel_values"] for r in with_images]),
                     "image_grid_thw": torch.cat([r["image_grid_thw"] for r in with_images])}
            if self.token_type_ids:
                types = (batch.input_ids == self.image_token_id).to(torch.int32)
                if self.video_token_id is not None:
                    types[batch.input_ids == self.video_token_id] = 2
                extra["mm_token_type_ids"] = types
            batch.extra_inputs = extra
        return batch

    def __call__(self, rows: list[dict[str, Any]]) -> list[MicroBatch]:
        ordered = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)
        size = self.micro_batch_size
        return [self.micro_batch(ordered[i : i + size]) for i in range(0, len(ordered), size)]


class VisionDataModule(ChatDataModule):
    """Image-grounded chat SFT for Qwen2.5-VL-style models (e.g. WeThink): see the module docstring.

    Args:
        train: training data: a file, a directory of files, or a hub dataset id.
        fields: row field names (unset: candidates, see the module docstring).
        image_root: directory that relative image paths are relative to (default: the data file's).
        image_marker: text marking where an image goes in a question or message.
        require_image: drop rows without an image (``no_image``); false keeps them as text chats.
        response_template: build the response from row fields (``str.format`` names), e.g.
            ``"<think>{reasoning}</think>{answer}"``; default: the response field.
        min_pixels: image processor lower bound on pixels per image (default: the checkpoint's).
        max_pixels: upper bound (default: the checkpoint's); images are resized into the range.
        verify_images: decode every image at setup (corrupt files become counted drops); false
            reads only headers (faster; a corrupt file then fails when loaded, naming the row).
        packing: not supported for images; ``true`` raises.
        Other arguments: as ``ChatDataModule``.
    """

    cacheable = False  # rows carry image references (and decoded images from the hub)

    def __init__(
        self, train: str, val: str | None = None, test: str | None = None, tokenizer: str | None = None,
        split: str = "train", val_split: str = "test", subset: str | None = None, val_fraction: float = 0.0,
        fields: VisionFields | None = None, image_root: str | None = None, image_marker: str = "<image>",
        require_image: bool = True, system_prompt: str | None = None, prompt_template: str = "{prompt}",
        response_template: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
        verify_images: bool = True, max_length: int = 4096, overlong: Literal["drop", "truncate"] = "drop",
        batch_size: int = 256, micro_batch_size: int = 1, max_samples: int | None = None, seed: int = 42,
        strict: bool = False, num_workers: int = 0, packing: bool = False,
    ) -> None:
        if packing:
            raise DataError("data.packing is not supported with images (VisionDataModule); set data.packing=false")
        super().__init__(
            train=train, val=val, test=test, tokenizer=tokenizer, split=split, val_split=val_split, subset=subset,
            val_fraction=val_fraction, system_prompt=system_prompt, prompt_template=prompt_template,
            max_length=max_length, overlong=overlong, batch_size=batch_size, micro_batch_size=micro_batch_size,
            max_samples=max_samples, seed=seed, strict=strict, num_workers=num_workers,
        )
        self.fields = fields or VisionFields()
        self.candidates = {
            f.name: CANDIDATES[f.name] if getattr(self.fields, f.name) is None else (getattr(self.fields, f.name),)
            for f in dataclass_fields(VisionFields) if f.name in CANDIDATES
        }
        self.image_root, self.image_marker, self.require_image = image_root, image_marker, require_image
        self.response_template, self.verify_images = response_template, verify_images
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_processor: Any = None
        self._root = Path(".")

    # -- tokenizer, image processor ------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        from transformers import AutoConfig, AutoImageProcessor

        from dft_lightning.pretrained import resolve_pretrained

        tokenizer = super().load_tokenizer()
        path = resolve_pretrained(self.tokenizer_spec)
        config = AutoConfig.from_pretrained(path)
        ids = dict(zip(VISION_TOKEN_NAMES, tokenizer.convert_tokens_to_ids(list(VISION_TOKEN_NAMES)), strict=True))
        self.image_token_id = getattr(config, "image_token_id", None) or ids["<|image_pad|>"]
        self.video_token_id = getattr(config, "video_token_id", None) or ids["<|video_pad|>"]
        unk = tokenizer.unk_token_id
        self.vision_ids = {i for i in (*ids.values(), self.image_token_id, self.video_token_id)
                           if i is not None and i != unk}
        self.token_type_ids = _forward_takes(config, "mm_token_type_ids")
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                 {"role": "assistant", "content": "."}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception as e:  # noqa: BLE001 - any template failure means it cannot render images
            raise DataError(f"the chat template of {self.tokenizer_spec} cannot render image parts: {e}") from None
        rendered = tokenizer(text, add_special_tokens=False)["input_ids"]
        if rendered.count(self.image_token_id) != 1:
            raise DataError(f"the chat template of {self.tokenizer_spec} does not render an image part as one "
                            f"image placeholder token (id {self.image_token_id}); use a vision-language checkpoint")
        bounds = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(path, **bounds)
        except (OSError, ValueError) as e:
            raise DataError(f"no image processor for {self.tokenizer_spec}: {e}") from None
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        return tokenizer

    def image_tokens(self, image: Any) -> int:
        """Number of placeholder tokens the processor gives ``image`` (patches / merge**2)."""
        count = getattr(self.image_processor, "get_number_of_image_patches", None)
        try:
            patches = (count(image.height, image.width) if count is not None
                       else int(self.image_processor(images=[image])["image_grid_thw"][0].prod()))
        except ValueError as e:  # e.g. an extreme aspect ratio
            raise DropRow("bad_image", f"image processor rejects a {image.width}x{image.height} image: {e}") from None
        return patches // self.merge**2

    # -- conversion ----------------------------------------------------------------------------
    def row_to_messages(self, row: Any) -> list[dict[str, Any]]:
        """Raw row -> chat whose user turn(s) hold ``{"type": "image", "image": source}`` parts."""
        if not isinstance(row, dict):
            raise DropRow("not_an_object")
        images = _as_list(_get(row, self.candidates["images"]))
        if not images and self.require_image:
            raise DropRow("no_image", " or ".join(f"field {n!r}" for n in self.candidates["images"]) + " is empty")
        images = [_resolve(s, self._root) for s in images]
        messages = row.get(self.fields.messages)
        if messages:
            turns = to_messages(row, FieldMap(messages=self.fields.messages))
        else:
            question = _get(row, self.candidates["question"])
            if question is None:
                raise DropRow("missing_field", " or ".join(f"field {n!r}" for n in self.candidates["question"]))
            if not isinstance(question, str):
                raise DropRow("bad_type", "the question must be a string")
            if not question.strip():
                raise DropRow("empty_prompt")
            turns = [{"role": "user", "content": self.prompt_template.format(prompt=question)},
                     {"role": "assistant", "content": self._response(row)}]
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return self._place_images(turns, images)

    def _response(self, row: dict[str, Any]) -> str:
        if self.response_template is not None:
            try:
                response = self.response_template.format_map(row)
            except KeyError as e:
                raise DropRow("missing_field", f"field {e.args[0]!r} (data.response_template)") from None
        else:
            response = _get(row, self.candidates["response"])
            if response is None:
                raise DropRow("missing_field", " or ".join(f"field {n!r}" for n in self.candidates["response"]))
        if not isinstance(response, str):
            raise DropRow("bad_type", "the response must be a string")
        if not response.strip():
            raise DropRow("empty_response")
        return response

    def _place_images(self, turns: list[dict[str, str]], images: list[Any]) -> list[dict[str, Any]]:
        markers = sum(t["content"].count(self.image_marker) for t in turns if t["role"] != "assistant")
        if markers and markers != len(images):
            raise DropRow("image_mismatch", f"{markers} {self.image_marker!r} markers for {len(images)} images")
        queue = list(images)
        out: list[dict[str, Any]] = []
        for turn in turns:
            if turn["role"] == "assistant" or not (queue and (markers or turn["role"] == "user")):
                out.append(dict(turn))
                continue
            parts: list[dict[str, Any]] = []
            if markers:
                pieces = turn["content"].split(self.image_marker)
                for i, piece in enumerate(pieces):
                    if i:
                        parts.append({"type": "image", "image": queue.pop(0)})
                    if piece:
                        parts.append({"type": "text", "text": piece})
            else:
                parts = [{"type": "image", "image": s} for s in queue] + [{"type": "text", "text": turn["content"]}]
                queue = []
            out.append({"role": turn["role"], "content": parts})
        return out

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, encoder: ChatEncoder, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Chat with image parts -> a row (ids, labels, image sources and token counts) and ``truncated``."""
        sources = [p["image"] for m in messages if isinstance(m["content"], list)
                   for p in m["content"] if p.get("type") == "image"]
        counts = []
        for source in sources:
            image = open_image(source, verify=self.verify_images)
            counts.append(self.image_tokens(image))
            if image is not source:
                image.close()
        plain = [m if isinstance(m["content"], str) else
                 {**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
                 for m in messages]
        ids, labels, _ = encoder.encode(plain)
        if self.video_token_id in ids or ids.count(self.image_token_id) != len(sources):
            raise DropRow("image_mismatch", f"the text holds {ids.count(self.image_token_id)} image placeholder "
                                            f"tokens for {len(sources)} images (or a video placeholder)")
        out_ids: list[int] = []
        out_labels: list[int] = []
        pending = iter(counts)
        for token, label in zip(ids, labels, strict=True):
            n = next(pending) if token == self.image_token_id else 1
            out_ids += [token] * n
            out_labels += [IGNORE_INDEX if token in self.vision_ids else label] * n
        truncated = False
        if len(out_ids) > self.max_length:
            if self.overlong == "drop":
                raise DropRow("overlong", f"longer than data.max_length={self.max_length} with image tokens")
            last_vision = max((i for i, t in enumerate(out_ids) if t in self.vision_ids), default=-1)
            if last_vision >= self.max_length:
                raise DropRow("overlong", f"truncating to data.max_length={self.max_length} would cut an image")
            out_ids, out_labels, truncated = out_ids[: self.max_length], out_labels[: self.max_length], True
        if all(t == IGNORE_INDEX for t in out_labels[1:]):
            raise DropRow("overlong" if truncated else "empty_response", "no supervised token left")
        return {"input_ids": out_ids, "labels": out_labels, "images": sources, "image_tokens": counts}, truncated

    def build(self, source: str, key: str, split: str, *, sample: int | None = None) -> tuple[list[dict], DataReport]:
        """Read, convert and tokenise one source (with images); returns the rows and their report."""
        if self.image_root is not None:
            self._root = Path(self.image_root).expanduser()
        elif looks_local(source):
            path = Path(source).expanduser()
            self._root = path if path.is_dir() else path.parent
        else:
            self._root = Path(".")
        rows, report = self.tokenise(source, key, split, sample=sample)
        images = sum(len(r["images"]) for r in rows)
        rank_zero_info(f"[{report.split}] {images} images in {len(rows)} kept rows")
        return rows, report

    def make_encoder(self) -> ChatEncoder:
        return ChatEncoder(self.tokenizer, sys.maxsize, "drop")  # length is checked after image expansion

    def encode_row(self, encoder: ChatEncoder, row: Any) -> tuple[dict[str, Any], bool]:
        return self.encode(encoder, self.row_to_messages(row))

    def _loader(self, name: str, *, shuffle: bool, drop_last: bool, global_batch: int) -> DataLoader:
        rank, world = self._world()
        sampler = StepBatchSampler(
            len(self.datasets[name]), global_batch, rank=rank, world_size=world, shuffle=shuffle, seed=self.seed,
            drop_last=drop_last,
        )
        collate = VisionStepCollator(self.micro_batch_size, self.tokenizer.pad_token_id, self.image_token_id,
                                     self.video_token_id, self.token_type_ids)
        dataset = VisionStepDataset(self.datasets[name], self.image_processor, self.merge)
        return guarded_loader(dataset, self.datasets[name], batch_sampler=sampler, collate_fn=collate,
                              num_workers=self.num_workers)


def _forward_takes(config: Any, name: str) -> bool:
    """Whether the base model class of ``config`` takes the keyword ``name`` in ``forward``."""
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return name in inspect.signature(MODEL_MAPPING[type(config)].forward).parameters
    except (KeyError, ValueError, TypeError):
        return False


def _get(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if row.get(n) is not None), None)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v is not None]
    return [value]


# -- a generated data set for smoke tests ----------------------------------------------------------
class ShapesDataModule(VisionDataModule):
    """Generated coloured-shape questions (one or two images per row) for smoke tests; no download.

    Args:
        num_train: training rows to generate.
        num_test: held-out rows (the validation set).
        data_dir: where the files go (default: the cache).
        generation_seed: seed of the generator.
        Other arguments: as ``VisionDataModule``.
    """

    def __init__(
        self, num_train: int = 32, num_test: int = 8, data_dir: str | None = None, generation_seed: int = 0,
        tokenizer: str | None = None, max_length: int = 512, batch_size: int = 8, micro_batch_size: int = 4,
        min_pixels: int | None = None, max_pixels: int | None = None, seed: int = 42, num_workers: int = 0,
    ) -> None:
        from dft_lightning.paths import cache_root

        root = Path(data_dir) if data_dir else cache_root() / "shapes" / f"{generation_seed}-{num_train}-{num_test}"
        super().__init__(
            train=str(root / "train.jsonl"), val=str(root / "test.jsonl"), tokenizer=tokenizer,
            min_pixels=min_pixels, max_pixels=max_pixels, max_length=max_length, batch_size=batch_size,
            micro_batch_size=micro_batch_size, seed=seed, num_workers=num_workers,
        )
        self.root, self.num_train, self.num_test, self.generation_seed = root, num_train, num_test, generation_seed

    def prepare_data(self) -> None:
        from dft_lightning.tiny_vl import write_shapes

        for split, n in (("train", self.num_train), ("test", self.num_test)):
            if not (self.root / f"{split}.jsonl").exists():
                write_shapes(self.root, split, n, self.generation_seed)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers ranks on other nodes
        super().setup(stage)
