"""Per-token statistics from final hidden states, in chunks, without full ``[tokens x vocab]`` logits.

``token_statistics`` takes the decoder's last hidden states and the output projection and returns
the log-probability of each target token (and, on request, the entropy of the next-token
distribution). Only supervised positions are projected at all, and they are processed in chunks of
``chunk_size`` tokens, each under activation checkpointing: the logits of one chunk exist at a time
in forward and are recomputed chunk by chunk in backward, so the loss path's peak memory is
``O(chunk_size x vocab)`` instead of ``O(tokens x vocab)``.

Not handled here: models whose head is more than a linear map (e.g. logit soft-capping is applied,
other output heads are not), the reference model (the caller runs this under ``no_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
#: Logit elements per chunk when the chunk size is automatic: 2**26 fp32 values = 256 MiB per copy,
#: whatever the vocabulary (e.g. ~440 tokens at Qwen2.5's 152k, ~1,365 at SmolLM2's 49k).
CHUNK_ELEMENTS = 2**26


def auto_chunk_size(vocab: int) -> int:
    """Tokens per chunk that keep one chunk's logits at ``CHUNK_ELEMENTS`` values (at least 64)."""
    return max(64, CHUNK_ELEMENTS // max(vocab, 1))


def _chunk_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None, want_entropy: bool
) -> tuple[Tensor, Tensor]:
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if want_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    else:
        entropy = logp.new_zeros(())
    return logp, entropy


def token_statistics(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    entropy: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token (and entropy) from hidden states and the output projection.

    Args:
        hidden: ``[batch, time, hidden]`` states that predict ``targets`` (already shifted).
        weight: ``[vocab, hidden]`` output projection (tied embeddings are fine).
        targets: ``[batch, time]`` token ids, ``-100`` where not supervised.
        bias: optional ``[vocab]`` output bias.
        entropy: also return the entropy of each position's next-token distribution.
        chunk_size: supervised tokens projected at once; ``None`` sizes chunks from the vocabulary
            (``auto_chunk_size``); ``0`` disables chunking (one chunk, no recomputation).
        softcap: final logit soft-capping (``tanh(x / c) * c``), for models that use it.

    Returns:
        ``(logp, entropy)``, each ``[batch, time]`` in at least float32, zero where ``targets == -100``;
        ``entropy`` is ``None`` unless requested.
    """
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    batch, time = targets.shape
    flat_targets = targets.reshape(-1)
    index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    states = hidden.reshape(batch * time, -1).index_select(0, index)
    picked = flat_targets.index_select(0, index)

    step = chunk_size if chunk_size and chunk_size > 0 else max(int(index.numel()), 1)
    logps, ents = [], []
    for start in range(0, int(index.numel()), step):
        h = states[start : start + step]
        t = picked[start : start + step]
        if chunk_size and torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_stats, h, weight, bias, t, softcap, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(h, weight, bias, t, softcap, entropy)
        logps.append(lp)
        ents.append(ent)

    def scatter(parts: list[Tensor]) -> Tensor:
        out = hidden.new_zeros(batch * time, dtype=torch.promote_types(hidden.dtype, torch.float32))
        if parts:
            out = out.index_put((index,), torch.cat(parts))
        elif hidden.requires_grad:  # nothing supervised: keep a (zero) graph so backward still runs everywhere
            out = out + 0.0 * hidden.sum()
        return out.view(batch, time)

    return scatter(logps), (scatter(ents) if entropy else None)
