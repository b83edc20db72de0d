"""Generation engines: prompts in, ``n`` completions per prompt out, behind one interface.

* ``SamplingParams``: n, temperature, top_p, max_tokens, stop strings, seed; defaults are the DFT paper's math
  evaluation (16 samples, temperature 1.0, top-p 1.0, 4096 new tokens). ``temperature=0`` is greedy: one
  completion is decoded and repeated ``n`` times.
* A prompt is a raw string (tokenized as is, with the tokenizer's special tokens such as a BOS), a chat (a list
  of ``{"role", "content"}`` messages, rendered by the chat template with the assistant turn opened) or a list
  of token ids. ``encode_prompts`` does this for both engines, so they see the same token ids. A chat whose
  contents hold ``{"type": "image", "image": ref}`` parts is multimodal (``vision_inputs``): the checkpoint's
  image processor turns its images into pixels and placeholder tokens (vision-language checkpoints only).
* ``Engine.generate`` returns the ``n`` completion texts of each prompt; ``generate_completions`` returns
  ``Completion`` objects (text, token ids, finish reason); ``generate_many`` runs several (prompts, params)
  requests at once (one vLLM start for all).
* ``HFEngine``: transformers ``generate`` in left-padded batches of ``batch_size`` sequences. The checkpoint's
  ``generation_config`` sampling defaults (top-k, repetition penalty, ...) are ignored, as in vLLM: only
  ``SamplingParams`` count. A seed seeds the torch RNG once per request (restored afterwards): results repeat
  for the same prompts, order and ``batch_size``.
* ``VLLMEngine`` (module ``vllm_engine``): ``vllm.LLM(...).generate`` in a child process
  (``_vllm_worker.py``, run by any interpreter with vllm: ``python=``), exchanging JSON/JSONL files in a
  temporary directory. Every call starts a fresh engine on the saved checkpoint; the child's memory (GPU or
  CPU) is returned when it exits. Prompt ``i`` gets the seed ``seed + i * n`` (vLLM gives its sample ``j``
  ``seed + i * n + j``): samples do not depend on batching.

Stop strings end a completion and are cut from its text (from the first occurrence on); token ids keep every
generated token up to the EOS token or the one that completed the stop string. ``finish_reason`` is
``"stop"`` (EOS or stop string) or ``"length"`` (``max_tokens`` reached).

Not handled: beam search, logprobs, top-k/min-p/penalties, LoRA adapters at generation time (export merged
weights), videos, updating the weights of a live engine, and identical *sampled* outputs across
the two engines (greedy decoding in float32 matches token for token).
"""

from __future__ import annotations

import abc
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dft_lightning.evaluation.vision_inputs import EncodedPrompt, VisionPromptEncoder, is_multimodal

__all__ = [
    "Completion",
    "Engine",
    "HFEngine",
    "Prompt",
    "SamplingParams",
    "VLLMEngine",
    "VLLMUnavailableError",
    "VLLMWorkerError",
    "encode_prompts",
    "truncate_at_stop",
    "vllm_available",
]

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]
Request = tuple[Sequence[Prompt], "SamplingParams | None"]

# Set by torch launchers and Lightning; a vLLM child must not take itself for a rank of the training job.
_DISTRIBUTED_ENV = (
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
        """The seed of prompt ``index`` (its samples use this seed plus 0..n-1)."""
        return None if self.seed is None else self.seed + index * self.n


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


def _eos_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and the checkpoint's generation config (vLLM stops on both too)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class Engine(abc.ABC):
    """Prompts in, ``n`` completions per prompt out (prompt order kept, samples of a prompt in order)."""

    @abc.abstractmethod
    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Completion]]]:
        """``result[r][i]``: the completions of prompt ``i`` of request ``r`` (``requests[r] = (prompts, params)``)."""

    def generate_completions(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[list[Completion]]:
        return self.generate_many([(prompts, params)])[0]

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[list[str]]:
        """The ``n`` completion texts of each prompt."""
        return [[c.text for c in samples] for samples in self.generate_completions(prompts, params)]

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


# --------------------------------------------------------------------------------------------------- HF


class _FinishTracker:
    """Stopping criterion for ``generate``: ends a row at an EOS token or once its completion's text holds a
    stop string, and records how many tokens each row had then (``None``: still running)."""

    def __init__(self, tokenizer: Any, prompt_width: int, rows: int, eos: frozenset[int], stop: Sequence[str]):
        self.tokenizer, self.prompt_width, self.eos, self.stop = tokenizer, prompt_width, eos, tuple(stop)
        self.lengths: list[int | None] = [None] * rows
        # a stop string of b bytes ends in the newest token and starts at most b tokens back; margin for
        # tokenizers whose decoding of a fragment differs at its start (dropped leading spaces)
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 4

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width
        last = input_ids[:, -1].tolist()
        tails = None
        if self.stop:
            tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :].tolist()
        for row, length in enumerate(self.lengths):
            if length is not None:
                continue
            if last[row] in self.eos:
                self.lengths[row] = step
            elif tails is not None:
                text = self.tokenizer.decode(tails[row], skip_special_tokens=True)
                if any(s in text for s in self.stop):
                    self.lengths[row] = step
        return torch.tensor([n is not None for n in self.lengths], dtype=torch.bool, device=input_ids.device)


class HFEngine(Engine):
    """transformers ``generate`` on one device. For small models, tests and CPU; see ``VLLMEngine`` for speed.

    Args:
        model_path: a local HF directory, hub id, GGUF file or ``tiny:<arch>`` (as ``model.pretrained``).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's).
        batch_size: sequences decoded at once (a prompt with ``n`` samples takes ``n`` rows).
        device: ``cuda``, ``cuda:1``, ``cpu``...; default: CUDA when available.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``sdpa``, ``eager``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        dtype: str = "float32",
        batch_size: int = 32,
        device: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

        from dft_lightning.pretrained import load_tokenizer, resolve_pretrained

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = resolve_pretrained(str(model_path))
        self.model_path, self.batch_size = path, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(path)
        kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(path, **kwargs)
        self._takes_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self.eos_ids = _eos_ids(self.tokenizer, model.generation_config)
        self.pad_id = self.tokenizer.pad_token_id
        # only SamplingParams decide how to sample: drop the checkpoint's sampling defaults
        model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_token_id
        )
        self.model = model.to(self.device).eval()

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Completion]]]:
        if self.model is None:
            raise RuntimeError("HFEngine is closed")
        return [self._request(self._encode(prompts), params or SamplingParams()) for prompts, params in requests]

    def _request(self, prompt_ids: list[EncodedPrompt], params: SamplingParams) -> list[list[Completion]]:
        import torch

        samples = 1 if params.greedy else params.n
        rows = [i for i in range(len(prompt_ids)) for _ in range(samples)]
        results: list[list[Completion]] = [[] for _ in prompt_ids]
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                for i, completion in zip(batch, self._batch([prompt_ids[i] for i in batch], params), strict=True):
                    results[i].append(completion)
        return [samples_ * params.n for samples_ in results] if params.greedy else results

    def _batch(self, prompts: list[EncodedPrompt], params: SamplingParams) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        made: dict[int, EncodedPrompt] = {}  # a prompt's n sample rows share its pixels
        for p in prompts:
            if p.source is not None and id(p) not in made:
                made[id(p)] = self._vision_encoder.encode(p.source, p.index)
        prompts = [made.get(id(p), p) for p in prompts]
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every completion starts at column `width`
            input_ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
            attention_mask[row, width - len(prompt.ids) :] = 1
        tracker = _FinishTracker(self.tokenizer, width, len(prompts), self.eos_ids, params.stop)
        kwargs: dict[str, Any] = {"do_sample": not params.greedy}
        with_images = [p for p in prompts if p.images]
        if with_images:  # the rows' patches in row order, as the model's forward expects them
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(self.device)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images]).to(self.device)
            if self._takes_mm_types:
                types = (input_ids == self._vision_encoder.image_token_id).to(torch.int32)
                kwargs["mm_token_type_ids"] = types.to(self.device)
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=params.max_tokens,
            stopping_criteria=StoppingCriteriaList([tracker]),
            **kwargs,
        )
        generated = sequences[:, width:].tolist()
        completions = []
        for row, length in enumerate(tracker.lengths):
            ids = generated[row] if length is None else generated[row][:length]
            # a byte-level token can end mid-character: drop the dangling U+FFFD, as vLLM's detokenizer does
            text = self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
            text = truncate_at_stop(text, params.stop)
            completions.append(Completion(text, tuple(ids), "length" if length is None else "stop"))
        return completions


# vLLM lives in its own module; its names stay importable from here.
from dft_lightning.evaluation.vllm_engine import (  # noqa: E402
    VLLMEngine,
    VLLMUnavailableError,
    VLLMWorkerError,
    vllm_available,
)
