"""GPU check: Qwen2.5-1.5B architecture (random weights, no download), FSDP2 + bf16 + activation checkpointing.

    python tools/gpu_check.py                 # on a GPU machine: prints tokens/s/GPU, MFU, DFT/SFT ratio
    python tools/gpu_check.py --tiny --steps 2   # a CPU smoke run of the same code path

Builds the model from a config written here (the published Qwen2.5-1.5B shapes), wraps it in
``FineTuneModule`` and trains on random token rows of ``--seq-len`` tokens (all supervised) through
Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` per decoder layer, fp32 master weights,
bf16 compute through ``fsdp_param_dtype``), with activation checkpointing. It times the optimizer
steps after ``--warmup`` steps for SFT and DFT on the same batches and prints

    tokens/s/GPU, model FLOPs utilisation (6 * parameters * tokens/s + attention, over the GPU's
    dense bf16 peak), and the DFT / SFT step-time ratio.

Not handled here: multi-GPU scaling (run it with more devices for that), real data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from dft_lightning.batch import MicroBatch  # noqa: E402

QWEN25_1P5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


class Timer(L.Callback):
    """Records the wall time of each optimizer step (synchronised on CUDA) and its supervised tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(float(sum(mb.supervised_tokens() for mb in batch)))


def random_steps(steps: int, micro: int, per_step: int, seq_len: int, vocab: int, seed: int = 0):
    """A loader-like list of optimizer steps, each a list of micro-batches of random fully supervised rows."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        step = []
        for _ in range(per_step):
            ids = torch.randint(0, vocab, (micro, seq_len), generator=g)
            step.append(MicroBatch(
                input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids),
                sequence_ids=torch.arange(micro).unsqueeze(1).expand(micro, seq_len).clone(),
                position_ids=torch.arange(seq_len).expand(micro, seq_len).clone(), row_ids=[None] * micro,
            ))
        data.append(step)
    return data


def run(objective_name: str, model_dir: str, args, config: dict) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from dft_lightning.module import FineTuneModule
    from dft_lightning.objectives import DFT, SFT

    objective = {"SFT": SFT, "DFT": DFT}[objective_name]()
    cuda = torch.cuda.is_available()
    module = FineTuneModule(model_dir, objective=objective, gradient_checkpointing=True,
                            fsdp_param_dtype="bfloat16" if cuda else None, attn_implementation="sdpa",
                            warmup_ratio=0.0, chunk_size=args.chunk_size)
    steps = random_steps(args.warmup + args.steps, args.micro_batch, args.accumulation, args.seq_len,
                         config["vocab_size"])
    loader = DataLoader(steps, batch_size=None, collate_fn=lambda x: x)
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=ModelParallelStrategy(),
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    times = timer.times[args.warmup:]
    tokens = timer.tokens[args.warmup:]
    seconds = sum(times)
    params = sum(p.numel() for p in module.model.parameters())
    tokens_per_s = sum(tokens) / seconds
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    # 6N per token for the dense parts, plus causal attention (QK^T and AV, forward + backward)
    flops_per_token = 6 * params + 6 * layers * hidden * args.seq_len
    result = {"objective": objective_name, "step_s": seconds / len(times), "tokens_per_s_per_gpu": tokens_per_s,
              "params": params, "model_tflops": flops_per_token * tokens_per_s / 1e12}
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result.update(device=name, peak_tflops=peak, mfu=(result["model_tflops"] / peak) if peak else None,
                      max_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: sized from the vocabulary")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.micro_batch = min(args.seq_len, 128), min(args.micro_batch, 2)

    from transformers import AutoConfig, AutoModelForCausalLM

    config = TINY if args.tiny else QWEN25_1P5B
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **config), dtype=torch.float32)
        model.save_pretrained(tmp)
        del model
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        results = [run(name, tmp, args, config) for name in ("SFT", "DFT")]
    sft, dft = results
    print(json.dumps(results, indent=2))
    print(f"tokens/s/GPU (SFT): {sft['tokens_per_s_per_gpu']:.0f}")
    if sft.get("mfu") is not None:
        print(f"MFU (SFT): {sft['mfu']:.1%} on {sft['device']}")
    print(f"DFT / SFT step time: {dft['step_s'] / sft['step_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
