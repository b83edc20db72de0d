"""Tiny random models with locally trained tokenizers, for smoke tests and CI (no downloads).

``tiny_model_dir("qwen2")`` builds (once, cached) a two-layer Qwen2 with a byte-level BPE tokenizer
trained here on the demo math text. The tokenizer uses the same normaliser, pre-tokenizer split
pattern and decoder that transformers' ``Qwen2Tokenizer`` imposes on load, so ids do not shift when
``AutoTokenizer`` re-creates it. It carries a ChatML chat template, like the Qwen2.5 instruct models.
The ``model.pretrained`` value ``tiny:qwen2`` resolves to this directory.

Not handled here: anything meant to produce a useful model; weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TINY_CONFIGS = {
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
    ),
}
VERSION = 1


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE in Qwen2's layout and save it with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from dft_lightning.data.synthetic import generate

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [r["problem"] + "\n" + r["solution"] for s in ("train", "test") for r in generate(s, 300, seed=123)]
    corpus += ["system user assistant You are a helpful assistant. Please reason step by step."] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 1024,
        "chat_template": CHATML_TEMPLATE,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_model(out_dir: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Write a tiny random model of ``arch`` and its tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(TINY_CONFIGS)}")
    train_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **TINY_CONFIGS[arch],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_dir(arch: str = "qwen2") -> Path:
    """The cached tiny model directory for ``arch``, built on first use (safe under concurrency)."""
    from dft_lightning.paths import atomic_dir, cache_root

    target = cache_root() / "tiny" / f"{arch}-v{VERSION}"
    with atomic_dir(target) as tmp:
        if tmp is not None:
            build_tiny_model(tmp, arch)
    return target
