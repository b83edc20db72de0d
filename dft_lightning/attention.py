"""Attention that stays inside each packed record, for every backend: one dispatcher.

A packed row holds several records back to back; each record must attend only to itself.
``decoder_inputs`` turns a ``MicroBatch`` into the decoder's keyword arguments for the configured
attention backend:

- flash-attention kernels (``flash_attention_2`` / ``_3`` / ``_4``, hub kernels): ``cu_seq_lens_q/k``
  and ``max_length_q/k`` over the flattened rows, so transformers calls the varlen kernel whatever
  the number of rows (it infers records from ``position_ids`` only when the batch has one row);
- ``VARLEN_SDPA`` (below): each row's record lengths as ``packed_segments``;
- ``sdpa`` on models that do not look attention up by name, ``eager`` and others: a dense
  block-diagonal causal ``[batch, 1, time, time]`` mask (bool for ``sdpa``, additive otherwise).

For the ``sdpa`` backend, the dense mask makes every token pay attention over the whole row and
rules out the causal fast path. Instead this module registers one more transformers attention
backend, ``VARLEN_SDPA``: it behaves exactly like ``sdpa`` unless the decoder is called with
``packed_segments``, in which case it runs causal ``sdpa`` on each record's slice of the row and
concatenates the outputs.

``CausalLMWithTokenStats`` switches a decoder configured for ``sdpa`` to this backend (the exported
config is unaffected: transformers does not save the attention backend). Layers with a sliding
window (Mistral, Qwen2 with ``use_sliding_window``) keep it: a record longer than the window gets a
banded causal mask of its own length (token ``i`` sees ``j`` when ``i - window < j <= i``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dft_lightning.batch import MicroBatch

VARLEN_SDPA = "dft_varlen_sdpa"


def varlen_sdpa_forward(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    packed_segments: list[list[int]] | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function; ``query``/``key``/``value`` are ``[batch, heads, time, head_dim]``.

    Returns ``[batch, time, heads, head_dim]`` like every transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window")
    if len(packed_segments) != query.shape[0]:
        raise ValueError(f"packed_segments has {len(packed_segments)} rows, the batch {query.shape[0]}")
    kwargs.pop("is_causal", None)
    rows = []
    for row, lengths in enumerate(packed_segments):
        if sum(lengths) != query.shape[2]:
            raise ValueError(f"packed_segments row {row} covers {sum(lengths)} tokens, the row has {query.shape[2]}")
        parts, start = [], 0
        for length in lengths:
            span = slice(start, start + length)
            mask = _band(length, window, query.device) if window is not None and length > window else None
            out, _ = sdpa_attention_forward(
                module, query[row : row + 1, :, span], key[row : row + 1, :, span], value[row : row + 1, :, span],
                mask, is_causal=mask is None, **kwargs,
            )
            parts.append(out)
            start += length
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0), None


def _band(length: int, window: int, device: torch.device) -> Tensor:
    """``[1, 1, length, length]`` bool: causal, and at most ``window - 1`` tokens back."""
    index = torch.arange(length, device=device)
    distance = index[:, None] - index[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def packed_attention_mask(sequence_ids: Tensor) -> Tensor:
    """``[batch, 1, time, time]`` bool mask: causal, and only within the same record (padding: its own block)."""
    time = sequence_ids.shape[1]
    causal = torch.ones(time, time, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    return (same & causal).unsqueeze(1)


def is_varlen_kernel(implementation: str) -> bool:
    """Backends that run transformers' flash-attention path (and take ``cu_seq_lens``)."""
    return "flash" in implementation or implementation.startswith("kernels-")


def decoder_inputs(mb: MicroBatch, implementation: str, *, sliding: bool, mask_dtype: torch.dtype) -> dict[str, Any]:
    """The decoder keyword arguments that keep ``mb``'s attention inside each record (see module doc).

    ``sliding`` says the decoder has sliding-window layers, which a single dense mask cannot serve;
    ``mask_dtype`` is the dtype of an additive mask (eager and other backends).
    """
    inputs: dict[str, Any] = {"input_ids": mb.input_ids, "position_ids": mb.position_ids, **mb.extra_inputs}
    if not mb.packed:
        return {**inputs, "attention_mask": mb.attention_mask}
    if is_varlen_kernel(implementation):
        cu, longest = mb.cu_seqlens()
        return {**inputs, "attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}
    if implementation == VARLEN_SDPA:
        # an all-ones mask: transformers then builds no mask of its own (records are the spans)
        return {**inputs, "attention_mask": torch.ones_like(mb.input_ids, dtype=torch.bool),
                "packed_segments": mb.segments}
    if sliding:
        raise NotImplementedError(f"packed rows with {implementation} attention and sliding-window layers: use "
                                  "attn_implementation sdpa or flash_attention_2")
    mask = packed_attention_mask(mb.sequence_ids)
    if implementation != "sdpa":  # eager and others add the mask to the scores
        mask = torch.zeros(mask.shape, dtype=mask_dtype, device=mask.device).masked_fill(~mask,
                                                                                        torch.finfo(mask_dtype).min)
    return {**inputs, "attention_mask": mask}


def register() -> None:
    """Make ``VARLEN_SDPA`` a transformers attention backend (with ``sdpa``'s mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)


def use_varlen_sdpa(config: Any, model: Any = None) -> bool:
    """Switch a decoder ``config`` from ``sdpa`` to ``VARLEN_SDPA`` (same results on unpacked rows).

    Only for models that look their attention function up by name (transformers'
    ``_supports_attention_backend``); others keep ``sdpa`` and the dense block-diagonal mask.
    """
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return getattr(config, "_attn_implementation", None) == VARLEN_SDPA
    if model is not None and not getattr(model, "_supports_attention_backend", False):
        return False
    register()
    config._attn_implementation = VARLEN_SDPA
    return True
