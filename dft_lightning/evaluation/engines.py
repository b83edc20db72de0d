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
  or (prompts, params, indices) requests at once (one vLLM start for all). ``indices[i]`` is prompt ``i``'s
  index in its benchmark (default ``i``): the seeds of its samples come from it, so a problem gets the same
  seeds evaluated alone, in a shard (``evaluate_model(shard=...)``) or with every other problem.
* Seeds: sample ``j`` of the problem with index ``i`` has the seed ``seed + i * n + j``
  (``SamplingParams.sample_seed``).
* ``HFEngine``: transformers ``generate`` in left-padded batches of ``batch_size`` sequences. The checkpoint's
  ``generation_config`` sampling defaults (top-k, repetition penalty, ...) are ignored, as in vLLM: only
  ``SamplingParams`` count. Every sample row draws its tokens from its own ``torch.Generator`` seeded with its
  sample seed (Gumbel-max over the temperature- and top-p-shaped logits), and the torch RNG is left alone: a
  sample does not depend on which other prompts share its batch, the batch size or the prompt order (up to
  float rounding differences between batch shapes, which change a token only at near-ties).
* ``VLLMEngine`` (module ``vllm_engine``): ``vllm.LLM(...).generate`` in a child process
  (``_vllm_worker.py``, run by any interpreter with vllm: ``python=``), exchanging JSON/JSONL files in a
  temporary directory. Every call starts a fresh engine on the saved checkpoint; the child's memory (GPU or
  CPU) is returned when it exits. Prompt ``i`` is sent with the seed ``seed + i * n`` (vLLM gives its sample
  ``j`` ``seed + i * n + j``). vLLM's kernels are not batch invariant: the logits of a sequence depend a little
  on what else is in its batch (continuous batching, chunked prefill), so a sampled completion can differ
  between a sharded and an unsharded run, or between runs with other prompts, even with the same seed.

Stop strings end a completion and are cut from its text (from the first occurrence on); token ids keep every
generated token up to the EOS token or the one that completed the stop string. ``finish_reason`` is
``"stop"`` (EOS or stop string) or ``"length"`` (``max_tokens`` reached).

Not handled: beam search, logprobs, top-k/min-p/penalties, LoRA adapters at generation time (export merged
weights), videos, updating the weights of a live engine, and identical *sampled* outputs across
the two engines (greedy decoding in float32 matches token for token).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

from dft_lightning.evaluation.engine_base import (
    Completion,
    Engine,
    Prompt,
    Request,
    SamplingParams,
    encode_prompts,
    truncate_at_stop,
    unpack_request,
)
from dft_lightning.evaluation.vision_inputs import EncodedPrompt
from dft_lightning.evaluation.vllm_engine import VLLMEngine, VLLMUnavailableError, VLLMWorkerError, vllm_available
from dft_lightning.progress import advance

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


def _eos_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and the checkpoint's generation config (vLLM stops on both too)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return frozenset(ids)


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


class _RowSampler:
    """Logits processor that samples every row from its own generator: softmax(logits / temperature), cut to the
    top-p nucleus, by Gumbel-max (argmax of the logits plus Gumbel noise drawn from the row's generator). It returns
    0 for the chosen token and -inf elsewhere, so ``generate``'s greedy step takes it. A row's draws depend on its
    seed and step only, never on the other rows of the batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: Any) -> None:
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float() / self.temperature
        if self.top_p < 1:
            probs, order = logits.softmax(-1).sort(-1, descending=True)
            outside = (probs.cumsum(-1) - probs) >= self.top_p  # the mass before a token already reaches top_p
            logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
        width = logits.shape[-1]
        uniform = torch.stack([torch.rand(width, generator=g, device=logits.device) for g in self.generators])
        picks = (logits - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, picks, 0.0)


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
        results = []
        for request in requests:
            prompts, params, indices = unpack_request(request)
            results.append(self._request(self._encode(prompts), params.with_random_seed(), indices))
        return results

    def _request(
        self, prompt_ids: list[EncodedPrompt], params: SamplingParams, indices: list[int]
    ) -> list[list[Completion]]:
        import torch

        samples = 1 if params.greedy else params.n
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(samples)]
        results: list[list[Completion]] = [[] for _ in prompt_ids]
        finished = 0
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                seeds = [params.sample_seed(indices[i], j) for i, j in batch]
                completions = self._batch([prompt_ids[i] for i, _ in batch], params, seeds)
                for (i, _), completion in zip(batch, completions, strict=True):
                    results[i].append(completion)
                now = (start + len(batch)) // samples  # prompts with all their samples
                advance(now - finished)  # dft_lightning.progress: problems generated
                finished = now
        return [samples_ * params.n for samples_ in results] if params.greedy else results

    def _batch(self, prompts: list[EncodedPrompt], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

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
        # generate decodes greedily; for sampling, _RowSampler has already picked each row's token
        kwargs: dict[str, Any] = {"do_sample": False}
        if not params.greedy:
            sampler = _RowSampler(seeds, params.temperature, params.top_p, self.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with_images = [p for p in prompts if p.images]
        if with_images:  # the rows' patches in row order, as the model's forward expects them
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(self.device)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images]).to(self.device)
            if self._takes_mm_types:
                types = (input_ids == self._vision_encoder.image_token_id).to(torch.int32)
                kwargs["mm_token_type_ids"] = types.to(self.device)
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

