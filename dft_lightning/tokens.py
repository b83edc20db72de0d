"""Per-token statistics from final hidden states, in chunks, without full ``[tokens x vocab]`` logits.

``token_statistics`` takes the decoder's last hidden states and the output projection and returns
the log-probability of each target token (and, on request, the entropy of the next-token
distribution). Only supervised positions are projected at all, and they are processed in chunks of
``chunk_size`` tokens, each under activation checkpointing: the logits of one chunk exist at a time
in forward and are recomputed chunk by chunk in backward, so the loss path's peak memory is
``O(chunk_size x vocab)`` instead of ``O(tokens x vocab)``.

Statistics beyond the target log-prob are described once each in ``STATISTICS`` (a name, how to
compute it from one chunk's float32 logits and log-normaliser, what it means): an objective names
them in ``requires`` (with options in ``statistic_options``, e.g. ``{"topk_entropy": {"k": 20}}``)
and finds them in ``TokenStats``. Adding a statistic is one ``register_statistic`` call.

Not handled here: models whose head is more than a linear map (e.g. logit soft-capping is applied,
other output heads are not), running the reference model (the caller runs it under ``no_grad`` and
passes its final states as ``ReferenceStates``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Chunk:
    """What a statistic sees of one chunk of supervised positions (``[tokens, vocab]`` logits at most).

    Attributes:
        logits: the policy's logits (float32 or wider, soft-capped when the model does).
        lse: their ``logsumexp``, ``[tokens]``.
        targets: the target ids, ``[tokens]``.
        ref_logits: the reference model's logits of the same positions (no gradient), for
            statistics registered with ``needs_reference``; else ``None``.
    """

    logits: Tensor
    lse: Tensor
    targets: Tensor
    ref_logits: Tensor | None = None


@dataclass(frozen=True)
class Statistic:
    """A per-token statistic of the next-token distribution, computed chunk by chunk.

    ``compute(chunk, options)`` gets one ``Chunk`` and the requesting objective's options for this
    statistic and returns ``[tokens]``. It runs under the chunk's activation checkpoint, so it is
    differentiable and recomputed in backward like the logits. ``needs_reference``: the chunk
    carries the reference model's logits too (the module then keeps the reference's final hidden
    states and output projection for the step).
    """

    name: str
    compute: Callable[[Chunk, Mapping[str, Any]], Tensor]
    doc: str = ""
    needs_reference: bool = False


STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str, compute: Callable[[Chunk, Mapping[str, Any]], Tensor], doc: str = "", *,
                       needs_reference: bool = False) -> Statistic:
    """Make ``name`` a statistic objectives may ``require`` (replaces one of the same name)."""
    STATISTICS[name] = Statistic(name, compute, doc, needs_reference)
    return STATISTICS[name]


def _entropy(chunk: Chunk, options: Mapping[str, Any]) -> Tensor:
    return chunk.lse - (torch.softmax(chunk.logits, dim=-1) * chunk.logits).sum(-1)


def _topk_entropy(chunk: Chunk, options: Mapping[str, Any]) -> Tensor:
    k = int(options.get("k", 20))
    if k < 1:
        raise ValueError(f"topk_entropy: k must be at least 1, got {k}")
    top = chunk.logits.topk(min(k, chunk.logits.shape[-1]), dim=-1).values
    logq = torch.log_softmax(top, dim=-1)
    return -(logq.exp() * logq).sum(-1)


def _kl_reference(chunk: Chunk, options: Mapping[str, Any]) -> Tensor:
    """``KL(pi_ref || pi) = sum_v p_ref (log p_ref - log p)`` over the full vocabulary."""
    assert chunk.ref_logits is not None
    ref_logq = torch.log_softmax(chunk.ref_logits, dim=-1)
    logq = chunk.logits - chunk.lse.unsqueeze(-1)
    p_ref = ref_logq.exp()
    terms = p_ref * (ref_logq - logq)
    return torch.where(p_ref > 0, terms, torch.zeros_like(terms)).sum(-1)  # 0 where p_ref = 0, not 0 * inf


register_statistic("entropy", _entropy, "entropy of the next-token distribution (nats)")
register_statistic("topk_entropy", _topk_entropy,
                   "entropy of the next-token distribution renormalised over its top k tokens (option k, default "
                   f"20; at most ln k = {math.log(20):.2f} nats for k = 20)")
register_statistic("kl_reference", _kl_reference,
                   "KL(reference || policy) of the next-token distributions over the full vocabulary",
                   needs_reference=True)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _chunk_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
    requested: tuple[tuple[str, Mapping[str, Any]], ...], ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
) -> tuple[Tensor, ...]:
    logits = _logits(hidden, weight, bias, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    ref_logits = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = _logits(ref_hidden, ref_weight, ref_bias, softcap)
    chunk = Chunk(logits, lse, targets, ref_logits)
    return (logp, *(STATISTICS[name].compute(chunk, options) for name, options in requested))


@dataclass
class ReferenceStates:
    """A reference model's final hidden states (shifted like the policy's) and output projection."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


def chunked_statistics(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    requested: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    reference: ReferenceStates | None = None,
) -> dict[str, Tensor]:
    """``{"logp": ..., <each requested statistic>: ...}``, each ``[batch, time]``, zero where not supervised.

    Args:
        hidden: ``[batch, time, hidden]`` states that predict ``targets`` (already shifted).
        weight: ``[vocab, hidden]`` output projection (tied embeddings are fine).
        targets: ``[batch, time]`` token ids, ``-100`` where not supervised.
        requested: statistic name (a key of ``STATISTICS``) -> its options.
        bias: optional ``[vocab]`` output bias.
        chunk_size: supervised tokens projected at once; ``None`` sizes chunks from the vocabulary
            (``auto_chunk_size``); ``0`` disables chunking (one chunk, no recomputation).
        softcap: final logit soft-capping (``tanh(x / c) * c``), for models that use it.
        reference: the reference's states, for statistics that need them (``Statistic.needs_reference``).
    """
    unknown = set(requested or {}) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    wanted = tuple(sorted((name, dict(options or {})) for name, options in (requested or {}).items()))
    if reference is None and any(STATISTICS[name].needs_reference for name, _ in wanted):
        raise ValueError(f"statistics {[n for n, _ in wanted if STATISTICS[n].needs_reference]} need the "
                         "reference model's states")
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    batch, time = targets.shape
    flat_targets = targets.reshape(-1)
    index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    states = hidden.reshape(batch * time, -1).index_select(0, index)
    picked = flat_targets.index_select(0, index)
    ref_states = None
    if reference is not None and any(STATISTICS[name].needs_reference for name, _ in wanted):
        ref_states = reference.hidden.reshape(batch * time, -1).index_select(0, index).detach()

    step = chunk_size if chunk_size and chunk_size > 0 else max(int(index.numel()), 1)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, int(index.numel()), step):
        h = states[start : start + step]
        t = picked[start : start + step]
        ref = () if ref_states is None else (ref_states[start : start + step], reference.weight, reference.bias)
        if chunk_size and torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_stats, h, weight, bias, t, softcap, wanted, *ref, use_reentrant=False))
        else:
            parts.append(_chunk_stats(h, weight, bias, t, softcap, wanted, *ref))

    def scatter(values: list[Tensor]) -> Tensor:
        out = hidden.new_zeros(batch * time, dtype=torch.promote_types(hidden.dtype, torch.float32))
        if values:
            out = out.index_put((index,), torch.cat(values))
        elif hidden.requires_grad:  # nothing supervised: keep a (zero) graph so backward still runs everywhere
            out = out + 0.0 * hidden.sum()
        return out.view(batch, time)

    names = ["logp", *(name for name, _ in wanted)]
    return {name: scatter([p[i] for p in parts]) for i, name in enumerate(names)}


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
    out = chunked_statistics(hidden, weight, targets, {"entropy": {}} if entropy else None, bias=bias,
                             chunk_size=chunk_size, softcap=softcap)
    return out["logp"], out.get("entropy")
