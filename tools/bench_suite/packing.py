"""Packing against padding: real tokens/s and padding efficiency on a length mix."""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench_suite.common import (
    SFT,
    Result,
    Section,
    _goal,
    _timed_step,
    _to,
)


# -- 4: packing vs padding -------------------------------------------------------------------------
def _linear_macs(config: Any) -> tuple[int, int]:
    """Multiply-accumulates per token of the decoder's linear layers, and of the output projection."""
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 2 * config.hidden_size * (config.num_attention_heads + config.num_key_value_heads) * head_dim
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp), config.vocab_size * config.hidden_size


def _random_model_dir(root: Path, quick: bool, attn: str = "sdpa") -> tuple[Path, str]:
    """A random Qwen2 whose output projection has the share of the FLOPs it has in Qwen2.5-1.5B.

    Padding costs decoder compute only (the head runs on supervised positions alone), so a
    head-heavy toy model would understate what packing saves on the models the package trains.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = (dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if quick else
             dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4))
    config = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=True, **sizes)
    reference = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2)
    share, reference_share = (head / (decoder + head) for decoder, head in map(_linear_macs, (config, reference)))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root)
    return root, (f"random Qwen2 ({params / 1e6:.1f}M parameters: {sizes['num_hidden_layers']} layers, hidden "
                  f"{sizes['hidden_size']}, vocab {sizes['vocab_size']}; output projection {share:.0%} of the "
                  f"linear-layer FLOPs per token, Qwen2.5-1.5B: {reference_share:.0%}; {attn} attention"
                  + (", packed rows attended per record" if attn == "sdpa" else "") + "; fp32)")


def length_mix_records(count: int, low: int, high: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Records with lengths log-uniform in ``[low, high]``; the first quarter of each is an unsupervised prompt."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        n = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = max(1, n // 4)
        records.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row_id": f"r{i}"})
    return records


def bench_packing(args: argparse.Namespace, device: torch.device) -> Section:
    """Real tokens/s and padding efficiency: packing vs length-grouped padding vs arrival-order padding."""
    from dft_lightning.data.batching import PackedStepCollator, StepCollator, pad_rows, padding_efficiency
    from dft_lightning.module import FineTuneModule

    low, high, per_step, steps, micro = (32, 256, 48, 2, 4) if args.quick else (128, 1024, 64, args.pack_steps, 4)
    reps = 3 if args.quick else args.pack_reps
    section = Section("packing vs padding")
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir, described = _random_model_dir(Path(tmp), args.quick, args.pack_attn)
        module = FineTuneModule(str(model_dir), objective=SFT(), attn_implementation=args.pack_attn)
        module.configure_model()
    module.to(device)
    vocab = module.model.head().weight.shape[0]
    records = length_mix_records(per_step * steps, low, high, vocab)
    lengths = sorted(len(r["input_ids"]) for r in records)
    grouped, packed = StepCollator(micro, 0), PackedStepCollator(micro, 0, high)

    def arrival_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [pad_rows(rows[i : i + micro], 0) for i in range(0, len(rows), micro)]

    variants = {"packed": packed, "packed_dense_mask": packed, "padded": grouped, "padded_unsorted": arrival_order}
    if args.pack_attn != "sdpa":  # the dense-mask comparison is about the sdpa backend only
        del variants["packed_dense_mask"]
    config = module.model.lm.config
    backend = {name: "sdpa" if name == "packed_dense_mask" else config._attn_implementation for name in variants}
    section.settings.append(
        f"packing: {described}; {len(records)} records in {steps} steps of {per_step}, lengths log-uniform in "
        f"[{low}, {high}] (median {lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}), 3/4 of "
        f"each supervised; micro-batches of {micro} rows of at most {high} tokens for every variant (packed: "
        f"pack_length {high}); each micro-batch's forward + backward (SFT) timed {reps} times after a warm-up, "
        "variants interleaved"
        + (" (packed_dense_mask: the same packed micro-batches through plain sdpa with a block-diagonal mask)"
           if "packed_dense_mask" in variants else "")
        + "; step time = sum of the micro-batches' median times; tokens/s counts real tokens"
    )
    batches = {name: [[_to(mb, device) for mb in collate(records[s * per_step : (s + 1) * per_step])]
                      for s in range(steps)] for name, collate in variants.items()}
    flat = {name: [mb for step in steps_ for mb in step] for name, steps_ in batches.items()}
    times: dict[str, list[list[float]]] = {name: [[] for _ in mbs] for name, mbs in flat.items()}
    objective = SFT()
    names = list(variants)
    for name in names:  # warm-up: each variant's first micro-batch once
        config._attn_implementation = backend[name]
        _timed_step(module, flat[name][:1], objective, device)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            config._attn_implementation = backend[name]  # plain sdpa: a block-diagonal [B, 1, T, T] mask
            for i, mb in enumerate(flat[name]):
                times[name][i].append(_timed_step(module, [mb], objective, device))
    config._attn_implementation = backend["packed"]
    seconds = {name: sum(statistics.median(t) for t in times[name]) for name in names}
    real = {name: sum(mb.real_tokens() for mb in flat[name]) for name in names}
    efficiency = {name: [padding_efficiency(step) for step in batches[name]] for name in names}
    rate = {v: real[v] / seconds[v] for v in variants}
    eff = {v: statistics.mean(efficiency[v]) for v in variants}
    for name in variants:
        widest = max(range(len(flat[name])), key=lambda i: flat[name][i].input_ids.numel())
        shape = "x".join(map(str, flat[name][widest].input_ids.shape))
        print(f"  {name:>15}: {len(flat[name]):3d} micro-batches, {real[name]} real tokens in {seconds[name]:.2f} s: "
              f"{rate[name]:8.0f} real tokens/s, padding efficiency {eff[name]:.3f}; widest micro-batch {shape} "
              f"{statistics.median(times[name][widest]) * 1e3:.0f} ms")
    speedup = rate["packed"] / rate["padded_unsorted"]
    grouped_speedup = rate["packed"] / rate["padded"]
    goal_note = " at full sizes (quick sizes here)" if args.quick else ""

    def met(value: float, limit: float) -> bool | None:
        return None if args.quick else _goal(value, limit, at_most=False)
    section.results += [
        Result("padding_efficiency_packed", "real-token share, packing", eff["packed"], f"{eff['packed']:.3f}",
               ">= 0.95" + goal_note, met(eff["packed"], 0.95)),
        Result("padding_efficiency_unsorted", "real-token share, padding (micro-batches in arrival order)",
               eff["padded_unsorted"], f"{eff['padded_unsorted']:.3f}"),
        Result("padding_efficiency_padded", "real-token share, padding with the step's rows grouped by length "
               "(StepCollator)", eff["padded"], f"{eff['padded']:.3f}"),
        Result("tokens_per_s_packed", "real tokens/s, packing", rate["packed"], f"{rate['packed']:.0f}"),
        Result("tokens_per_s_unsorted", "real tokens/s, padding (arrival order)", rate["padded_unsorted"],
               f"{rate['padded_unsorted']:.0f}"),
        Result("tokens_per_s_padded", "real tokens/s, padding (length-grouped)", rate["padded"],
               f"{rate['padded']:.0f}"),
        Result("packing_speedup", "tokens/s packing / padding (arrival order)", speedup, f"{speedup:.2f}",
               ">= 1.5" + goal_note, met(speedup, 1.5)),
        Result("packing_speedup_grouped", "tokens/s packing / padding (length-grouped)", grouped_speedup,
               f"{grouped_speedup:.2f}", "report"),
    ]
    if "packed_dense_mask" in rate:
        section.results.append(Result(
            "packing_varlen_speedup", "tokens/s packing, per-record sdpa / block-diagonal mask",
            rate["packed"] / rate["packed_dense_mask"], f"{rate['packed'] / rate['packed_dense_mask']:.2f}", "report"))
    del module
    gc.collect()
    return section
