"""Packed-row attention without a ``[time x time]`` mask: scaled dot-product attention per record.

A packed row holds several records back to back; each record must attend only to itself. Flash
attention does that from the restarting ``position_ids`` (its varlen kernel). For the ``sdpa``
backend, the obvious way is a dense block-diagonal ``[batch, 1, time, time]`` mask, which makes
every token pay attention over the whole row, and rules out the causal fast path. Instead this module
registers one more transformers attention backend, ``VARLEN_SDPA``: it behaves exactly like ``sdpa``
unless the decoder is called with ``packed_segments`` (each row's record lengths), in which case it
runs causal ``sdpa`` on each record's slice of the row and concatenates the outputs.

``CausalLMWithTokenStats`` switches a decoder configured for ``sdpa`` to this backend (the exported
config is unaffected: transformers does not save the attention backend). Layers with a sliding
window (Mistral, Qwen2 with ``use_sliding_window``) keep it: a record longer than the window gets a
banded causal mask of its own length (token ``i`` sees ``j`` when ``i - window < j <= i``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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


def segment_lengths(sequence_ids: Tensor) -> list[list[int]]:
    """Each row's run lengths of equal ``sequence_ids`` (one record, or the padding at the end, per run)."""
    batch, time = sequence_ids.shape
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    rows: list[list[int]] = [[] for _ in range(batch)]
    positions = starts.nonzero().tolist()  # one device sync per forward
    for (row, start), nxt in zip(positions, positions[1:] + [[batch, 0]], strict=True):
        rows[row].append((nxt[1] if nxt[0] == row else time) - start)
    return rows


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
