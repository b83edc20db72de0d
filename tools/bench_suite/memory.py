"""Loss-path peak memory, chunked ``token_statistics`` against full logits; each measurement in a fresh process."""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench_suite.common import (
    GIB,
    LOSS_OBJECTIVES,
    MIB,
    REPO,
    Result,
    Section,
    TokenStats,
    _goal,
)


# -- 3: loss-path memory ---------------------------------------------------------------------------
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _naive_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, requested: dict[str, dict],
                 reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The naive loss path: full ``[tokens, vocab]`` logits, ``log_softmax`` and ``gather`` at once (and each
    requested statistic from the full distribution)."""
    logits = hidden @ weight.t()
    out: dict[str, torch.Tensor] = {}
    if "topk_entropy" in requested:
        logq = F.log_softmax(logits.topk(int(requested["topk_entropy"].get("k", 20)), dim=-1).values, dim=-1)
        out["topk_entropy"] = -(logq.exp() * logq).sum(-1).float()
    logsm = F.log_softmax(logits, dim=-1)
    del logits  # log_softmax keeps its output for backward, not its input
    out["logp"] = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    if "entropy" in requested:
        out["entropy"] = -(logsm.exp() * logsm).sum(-1).float()
    if "kl_reference" in requested:
        with torch.no_grad():
            ref_logsm = F.log_softmax(reference[0] @ reference[1].t(), dim=-1)
        out["kl_reference"] = (ref_logsm.exp() * (ref_logsm - logsm)).sum(-1).float()
    return out


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One loss-path measurement in this (fresh) process; returns sizes, peak growth and time."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    tokens, vocab, hidden_size = spec["tokens"], spec["vocab"], spec["hidden"]
    if device.type == "cpu" and spec.get("limit_bytes"):
        # Fail with an allocation error instead of calling the OOM killer on the whole machine.
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _proc_status_kib("VmSize") * 1024 + spec["limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    from dft_lightning.tokens import STATISTICS, ReferenceStates, chunked_statistics

    objective = LOSS_OBJECTIVES[spec["objective"]]()
    options = getattr(objective, "statistic_options", None) or {}
    requested = {n: options.get(n, {}) for n in objective.requires if n in STATISTICS}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=g).to(device)
    reference = None
    if any(STATISTICS[n].needs_reference for n in requested):  # a reference model's final states and projection
        reference = (torch.randn(tokens, hidden_size, generator=g).to(device, dtype),
                     (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device, dtype))

    def loss_path(h: torch.Tensor, t: torch.Tensor) -> None:
        n = t.numel()
        ref = None if reference is None else (reference[0][:n], reference[1])
        if spec["path"] == "chunked":
            states = None if ref is None else ReferenceStates(ref[0][None], ref[1])
            out = chunked_statistics(h[None], weight, t[None], requested, chunk_size=spec["chunk"], reference=states)
        else:
            out = {k: v[None] for k, v in _naive_stats(h, weight, t, requested, ref).items()}
        logp, ent = out.pop("logp"), out.pop("entropy", None)
        stats = TokenStats(
            logp=logp, mask=torch.ones(1, n, dtype=torch.bool, device=device),
            sequence=torch.zeros(1, n, dtype=torch.long, device=device),
            num_tokens=torch.tensor(float(n), device=device), entropy=ent, targets=t[None], extra=out,
        )
        objective(stats).loss.backward()

    loss_path(hidden[:8], targets[:8])  # thread pools, kernel caches: not part of the loss path's cost
    hidden.grad = weight.grad = None
    gc.collect()
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        out["peak_reset"] = _reset_peak_rss()
        base = _proc_status_kib("VmRSS") * 1024
        out["hwm_at_base"] = _proc_status_kib("VmHWM") * 1024
    start = time.perf_counter()
    try:
        loss_path(hidden, targets)
    except (RuntimeError, MemoryError) as e:  # CPU allocator failure under the address-space cap, CUDA OOM
        if "memory" not in str(e).lower():
            raise
        out["oom"] = str(e).splitlines()[0][:200]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        if not out["peak_reset"]:  # an import-time peak above the baseline would hide part of the growth
            base = min(base, out["hwm_at_base"])
    out.update(seconds=time.perf_counter() - start, growth_bytes=peak - base, base_bytes=base)
    return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["device"] == "cpu":
        spec = {**spec, "limit_bytes": max(_mem_available() - 3 * GIB, GIB)}
    # Blocks of 1 MiB and more are mmap-ed and unmapped when freed: the resident set then follows the tensors
    # alive (glibc's adaptive threshold would otherwise keep freed chunk buffers in its heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB), "MALLOC_TRIM_THRESHOLD_": str(MIB)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--memory-child", json.dumps(spec)],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        return {"error": f"exit {proc.returncode}: {tail}", "limit_bytes": spec.get("limit_bytes")}
    return {**json.loads(lines[-1]), "limit_bytes": spec.get("limit_bytes")}


def _memory_result(key: str, label: str, chunked: dict, naive: dict, goal: str, quick: bool) -> Result:
    failed = [r for r in (chunked, naive) if "error" in r]
    if failed or "oom" in chunked or not naive:
        return Result(key, label, None, "failed (see log)", goal)
    if "oom" in naive:  # only a bound: the naive path needs more than the cap
        bound = chunked["growth_bytes"] / naive["limit_bytes"]
        shown = (f"< {bound:.3f} (naive did not fit in {naive['limit_bytes'] / GIB:.1f} GiB; chunked "
                 f"{chunked['growth_bytes'] / MIB:.0f} MiB in {chunked['seconds']:.1f} s)")
        return Result(key, label, bound, shown, goal, None if quick or bound > 0.125 else True)
    ratio = chunked["growth_bytes"] / max(naive["growth_bytes"], 1)
    shown = (f"{ratio:.3f} ({chunked['growth_bytes'] / MIB:.0f} / {naive['growth_bytes'] / MIB:.0f} MiB; "
             f"{chunked['seconds']:.1f} s / {naive['seconds']:.1f} s)")
    return Result(key, label, ratio, shown, goal, None if quick else _goal(ratio, 0.125, at_most=True))


def bench_memory(args: argparse.Namespace, device: torch.device) -> Section:
    """Loss-path peak memory, chunked over naive, per objective; one subprocess per measurement."""
    tokens, vocab, hidden, chunk = (
        (2048, 32768, 64, 256) if args.quick else (args.mem_tokens, args.mem_vocab, args.mem_hidden, args.mem_chunk)
    )
    if chunk is None:
        from dft_lightning.tokens import auto_chunk_size

        chunk = auto_chunk_size(vocab)
    dtype = args.mem_dtype
    section = Section("loss-path memory")
    elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    logits_gib = tokens * vocab * elem / GIB
    extras = [] if args.quick else args.mem_extra_chunks
    extra_note = f"; also {', '.join(map(str, extras))} for SFT" if extras else ""
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak RSS growth (VmHWM after a reset, minus VmRSS with the inputs allocated; glibc told to mmap "
              "blocks >= 1 MiB so freed tensors leave the resident set)")
    section.settings.append(
        f"loss-path memory: {tokens} supervised tokens x vocab {vocab}, hidden {hidden}, {dtype} inputs; chunked = "
        f"token_statistics(chunk_size={chunk}{extra_note}) (each chunk's logits promoted to float32, checkpointed), "
        f"naive = full {dtype} logits ({logits_gib:.2f} GiB per [tokens x vocab] copy) + log_softmax + gather "
        f"(+ entropy, top-k entropy, or the KL to a reference's full logits) in one go; objectives SFT, DFT, SFT with "
        f"an entropy bonus (entropy), EAFT (topk_entropy) and ASFT (kl_reference: a reference's final states and "
        f"projection as extra inputs); {method}; "
        "one fresh process per measurement; the times shown include page faults of fresh allocations"
    )
    print(f"  {tokens} tokens x {vocab} vocab, hidden {hidden}, {dtype}, chunk {chunk}: "
          f"one naive logits copy = {logits_gib:.2f} GiB")

    def measure(name: str, path: str, chunk_size: int) -> dict[str, Any]:
        spec = {"path": path, "objective": name, "tokens": tokens, "vocab": vocab, "hidden": hidden,
                "chunk": chunk_size, "dtype": dtype, "device": str(device)}
        res = _run_memory_child(spec)
        where = f"{name:>7} {path:>7}" + (f" (chunk {chunk_size})" if path == "chunked" else "")
        if "error" in res:
            print(f"  {where}: failed: {res['error']}")
        elif "oom" in res:
            print(f"  {where}: out of memory under a cap of {res['limit_bytes'] / GIB:.1f} GiB ({res['oom']})")
        else:
            print(f"  {where}: peak growth {res['growth_bytes'] / MIB:9.0f} MiB in {res['seconds']:.1f} s"
                  + ("" if res.get("peak_reset", True) else " (VmHWM not resettable)"), flush=True)
        return res

    goal = "<= 0.125 at full sizes (quick sizes here)" if args.quick else "<= 0.125 (vocab >= 128k, >= 16k tokens)"
    naive_sft: dict[str, Any] = {}
    for name in LOSS_OBJECTIVES:
        chunked, naive = measure(name, "chunked", chunk), measure(name, "naive", chunk)
        naive_sft = naive if name == "sft" else naive_sft
        label = {"sft": "SFT", "dft": "DFT", "entropy": "SFT + entropy bonus", "eaft": "EAFT (top-20 entropy)",
                 "asft": "ASFT (full-vocabulary KL to a reference)"}[name]
        section.results.append(_memory_result(f"memory_ratio_{name}", f"loss-path peak memory chunked / naive, "
                                              f"{label}", chunked, naive, goal, args.quick))
    for extra in extras:
        chunked = measure("sft", "chunked", extra)
        section.results.append(_memory_result(f"memory_ratio_sft_chunk{extra}", "loss-path peak memory chunked / "
                                              f"naive, SFT, chunk_size {extra}", chunked, naive_sft, goal, False))
    return section
