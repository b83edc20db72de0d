"""Is the model under evaluation a chat model? What ``prompt_style: auto`` decides on.

A tokenizer's chat template alone does not make a chat model: Qwen2.5 *base* checkpoints ship one, and a base
model given a chat prompt rambles. So a model counts as a chat model only when both hold:

1. its name says it is an instruction-tuned variant: the checkpoint's name (the last part of a hub id, path,
   GGUF file or ``pkg:`` spec) holds ``instruct``, ``chat`` or ``it`` as a separate word, any case
   (``SmolLM2-135M-Instruct``, ``Llama-2-7b-chat-hf``, ``gemma-2-2b-it``; not ``Qwen2.5-Math-1.5B``);
2. its tokenizer loads and its chat template opens an assistant turn (rendering a user message with the
   generation prompt gives more than without it).

Anything else, including a tokenizer that cannot be read, is ``completion``: when unsure, the raw protocol.
An exported checkpoint (``.../hf/final``, the training callback's ``.../model``) says nothing by its name: the
callback passes the name of the checkpoint training started from (``model_name``), so fine-tuning an Instruct
model keeps chat prompts; a base model fine-tuned into a chat model needs ``prompt_style: chat`` set.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from dft_lightning.evaluation.benchmarks.base import ModelInfo

__all__ = ["CHAT_NAME_RE", "checkpoint_name", "describe_model"]

CHAT_NAME_RE = re.compile(r"(?i)(?:^|[-_. ])(instruct|chat|it)(?=$|[-_. ])")


def checkpoint_name(model: str) -> str:
    """The part of a model spec that names the checkpoint: ``org/Name`` -> ``Name``, ``pkg:p/F.gguf`` -> ``F``."""
    text = model.removeprefix("pkg:").rstrip("/")
    name = PurePosixPath(text).name or text
    return name.removesuffix(".gguf")


def describe_model(model: str, name: str | None = None) -> ModelInfo:
    """``ModelInfo`` for ``model`` (loaded only when ``name``, default ``model``, names a chat variant)."""
    label = checkpoint_name(name or model)
    match = CHAT_NAME_RE.search(label)
    if match is None:
        return ModelInfo(model, False, f"the name {label!r} does not say instruct/chat/it")
    try:
        from dft_lightning.pretrained import load_tokenizer

        tokenizer = load_tokenizer(model)
        turn = [{"role": "user", "content": "x"}]
        opened = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        closed = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - no tokenizer, no template, a template that fails: not a chat model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ModelInfo(model, False, f"the name {label!r} says {match.group(1)}, but its tokenizer and chat template "
                                       f"cannot be used ({reason})")
    if len(opened) <= len(closed):
        return ModelInfo(model, False, f"the name {label!r} says {match.group(1)}, but the chat template opens no "
                                       "assistant turn")
    return ModelInfo(model, True, f"the name {label!r} says {match.group(1)} and the chat template opens an "
                                  "assistant turn")
