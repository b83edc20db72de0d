"""What every generation engine shares: ``SamplingParams``, ``Completion``, prompt encoding and the ``Engine`` base.

``engines`` (``HFEngine``, and the public names of all engines) and ``vllm_engine`` (``VLLMEngine``) both build on
this module; see ``dft_lightning.evaluation.engines`` for the interface as a whole.

A request is ``(prompts, params)`` or ``(prompts, params, indices)``: ``indices[i]`` is prompt ``i``'s index in
the whole benchmark (default ``i``). Seeds come from these indices, so a problem's samples are the same whether
it is evaluated alone, in a shard or with every other problem.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dft_lightning.evaluation.vision_inputs import EncodedPrompt, VisionPromptEncoder, is_multimodal

__all__ = [
    "DISTRIBUTED_ENV",
    "Completion",
    "Engine",
    "Prompt",
    "Request",
    "SamplingParams",
    "encode_prompts",
    "truncate_at_stop",
    "unpack_request",
]

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]
Request = (
    tuple[Sequence[Prompt], "SamplingParams | None"]
    | tuple[Sequence[Prompt], "SamplingParams | None", Sequence[int]]
)

# Set by torch launchers and Lightning; a child process must not take itself for a rank of the training job.
DISTRIBUTED_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy; ``seed=None`` means not reproducible."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    stop: tuple[str, ...] = ()
    seed: int | None = 0

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def prompt_seed(self, index: int) -> int | None:
        """The seed of the problem with benchmark index ``index``: ``seed + index * n`` (its samples: plus 0..n-1)."""
        return None if self.seed is None else self.seed + index * self.n

    def sample_seed(self, index: int, sample: int) -> int | None:
        """The seed of sample ``sample`` of the problem with benchmark index ``index``."""
        if not 0 <= sample < self.n:
            raise ValueError(f"sample must be in [0, {self.n}), got {sample}")
        base = self.prompt_seed(index)
        return None if base is None else base + sample

    def with_random_seed(self) -> SamplingParams:
        """These params with a fresh seed from the OS when ``seed`` is ``None`` (one seed per request)."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(48))


@dataclass(frozen=True)
class Completion:
    """One sampled completion. ``finish_reason``: ``"stop"`` (EOS or stop string) or ``"length"``."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def unpack_request(request: Request) -> tuple[Sequence[Prompt], SamplingParams, list[int]]:
    """``(prompts, params, indices)`` of a request, with the default params and indices filled in and checked."""
    if not isinstance(request, tuple) or len(request) not in (2, 3):
        raise TypeError("a request is (prompts, params) or (prompts, params, indices)")
    prompts, params = request[0], request[1] or SamplingParams()
    if isinstance(prompts, str | Mapping):
        raise TypeError("prompts must be a list of prompts, not a single prompt")
    if len(request) == 2 or request[2] is None:
        return prompts, params, list(range(len(prompts)))
    indices = list(request[2])
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in indices):
        raise ValueError("indices must be non-negative integers (each prompt's index in its benchmark)")
    return prompts, params, indices


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: raw strings with the tokenizer's special tokens, chats through its chat
    template (generation prompt added, no second BOS), token-id lists unchanged."""
    if isinstance(prompts, str | Mapping):
        raise TypeError("prompts must be a list of prompts, not a single prompt")
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"prompt {index} is a chat but the tokenizer has no chat template; pass strings")
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError(f"prompt {index}: expected a string, a list of chat messages or token ids")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        encoded.append([int(t) for t in ids])
    return encoded


class Engine(abc.ABC):
    """Prompts in, ``n`` completions per prompt out (prompt order kept, samples of a prompt in order)."""

    @abc.abstractmethod
    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Completion]]]:
        """``result[r][i]``: the completions of prompt ``i`` of request ``r`` (``requests[r] = (prompts, params)``
        or ``(prompts, params, indices)``; ``unpack_request`` reads either)."""

    def generate_completions(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, indices: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        return self.generate_many([(prompts, params, indices)])[0]

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, indices: Sequence[int] | None = None
    ) -> list[list[str]]:
        """The ``n`` completion texts of each prompt (``indices``: each prompt's index in its benchmark)."""
        return [[c.text for c in samples] for samples in self.generate_completions(prompts, params, indices)]

    def close(self) -> None:
        """Release what the engine holds (nothing by default)."""
        return None

    # Engines that read a checkpoint set ``tokenizer`` and ``model_path``; these two serve both engines.
    _vision_encoder: VisionPromptEncoder | None = None

    def _vision(self, index: int) -> VisionPromptEncoder:
        """The checkpoint's image prompt encoder, built on the first image prompt (``index``: for the error)."""
        if self._vision_encoder is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.model_path)
            if getattr(config, "vision_config", None) is None:
                raise ValueError(f"prompt {index} has images but {self.model_path} is a text-only model")
            self._vision_encoder = VisionPromptEncoder(self.tokenizer, str(self.model_path), config)
        return self._vision_encoder

    def _encode(self, prompts: Sequence[Prompt]) -> list[EncodedPrompt]:
        """Text prompts through ``encode_prompts``; image + text chats checked and deferred (pixels later)."""
        if isinstance(prompts, str | Mapping):
            raise TypeError("prompts must be a list of prompts, not a single prompt")
        encoded: list[EncodedPrompt | None] = [None] * len(prompts)
        text = [i for i, p in enumerate(prompts) if not is_multimodal(p)]
        for i, ids in zip(text, encode_prompts(self.tokenizer, [prompts[i] for i in text]), strict=True):
            encoded[i] = EncodedPrompt(ids, ids, [])
        for i, prompt in enumerate(prompts):
            if encoded[i] is None:
                encoded[i] = self._vision(i).defer(prompt, i)
        return encoded  # type: ignore[return-value]

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
