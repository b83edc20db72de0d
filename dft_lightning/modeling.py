"""Model loading, LoRA, FSDP2 sharding plan and HF-format export.

What ``model.pretrained`` may name is resolved by ``dft_lightning.pretrained``.

Not handled here: tensor/pipeline parallelism, meta-device initialisation of very large models
(each rank loads the full weights on CPU before sharding), LoRA variants other than plain LoRA
when merging (DoRA merge raises).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dft_lightning import attention
from dft_lightning.batch import MicroBatch
from dft_lightning.errors import StorageError, UserError
from dft_lightning.paths import replacing_dir
from dft_lightning.pretrained import resolve_pretrained
from dft_lightning.tokens import ReferenceStates, chunked_statistics


def load_causal_lm(spec: str, dtype: str = "float32", attn_implementation: str | None = None) -> nn.Module:
    """Load a causal LM (hub id, local dir, GGUF, ``tiny:``) in ``dtype``.

    A checkpoint whose config has a ``vision_config`` (Qwen2.5-VL and other image-text-to-text
    models) loads through ``AutoModelForImageTextToText``: the full model, vision tower included,
    with a decoder (``base_model``) that takes ``pixel_values`` / ``image_grid_thw``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    path = resolve_pretrained(spec)
    if getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def apply_lora(lm: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """Wrap ``lm`` with peft LoRA adapters; ``lora`` holds ``peft.LoraConfig`` keyword arguments."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    try:
        return get_peft_model(lm, config)
    except ValueError as e:  # peft: target modules that match nothing (NoMatchingPeftModuleError)
        if "not found in the base model" not in str(e):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"model.lora.target_modules={lora.get('target_modules')!r} match no module of "
                        f"{type(lm).__name__}; its linear layers: {', '.join(linear)} (or 'all-linear')") from None


VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def freeze_vision_tower(lm: nn.Module) -> int:
    """Freeze the vision encoder of a vision-language model; returns the number of frozen tensors."""
    frozen = 0
    for name, param in hf_model(lm).named_parameters():
        if any(part in VISION_TOWER_NAMES for part in name.split(".")):
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError(f"model.freeze_vision: no vision tower ({', '.join(VISION_TOWER_NAMES)}) in this model")
    return frozen


def hf_model(lm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or ``lm`` itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class CausalLMWithTokenStats(nn.Module):
    """A causal LM whose forward returns per-token statistics instead of logits.

    Runs the decoder, then ``chunked_statistics`` on the shifted hidden states with the output
    projection's weight. Being one module, it is also the FSDP2 root: the embedding, final norm and
    output projection are gathered for the whole forward, head included.
    """

    def __init__(self, lm: nn.Module, chunk_size: int | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        config = hf_model(lm).config
        text_config = getattr(config, "text_config", None) or config
        self.text_config = text_config  # the decoder's config (a vision-language model's text part)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        attention.use_varlen_sdpa(text_config, hf_model(lm))  # packed rows without a [time x time] mask
        types = getattr(text_config, "layer_types", None)
        self.sliding = ("sliding_attention" in types if types is not None else
                        getattr(text_config, "sliding_window", None) is not None
                        and getattr(text_config, "use_sliding_window", True))

    def attn_implementation(self) -> str:
        return getattr(self.text_config, "_attn_implementation", None) or "eager"

    def decoder(self) -> nn.Module:
        inner = hf_model(self.lm)
        return inner.base_model if inner.base_model is not inner else inner.model

    def head(self) -> nn.Linear:
        head = hf_model(self.lm).get_output_embeddings()
        if type(head) is not nn.Linear:  # e.g. a LoRA-wrapped head: its weight alone is not the map
            raise NotImplementedError(f"output projection of type {type(head).__name__} is not supported")
        return head

    def forward(
        self, mb: MicroBatch, requested: Mapping[str, Mapping[str, Any]] | None = None,
        reference: ReferenceStates | None = None, *, states_only: bool = False,
    ) -> Any:
        """Per-token statistics of ``mb``, ``[rows, time - 1]`` each: ``logp`` and the ``requested`` ones
        (name -> options, see ``dft_lightning.tokens.STATISTICS``; ``reference`` for those that compare
        with a reference model).

        With ``states_only`` (a reference model, for statistics such as the full-vocabulary KL) it returns
        ``ReferenceStates``: the final hidden states and a copy of the output projection, kept for the
        step's backward (under FSDP2 the gathered projection is freed after this forward).

        Attention stays inside each record of packed rows on every backend
        (``attention.decoder_inputs``).
        """
        inputs = attention.decoder_inputs(mb, self.attn_implementation(), sliding=self.sliding,
                                          mask_dtype=self.head().weight.dtype)
        out = self.decoder()(**inputs, use_cache=False)
        hidden = out.last_hidden_state[:, :-1]
        head = self.head()
        if states_only:
            keep = (lambda t: t.detach().clone()) if getattr(self, "fsdp_sharded", False) else (lambda t: t.detach())
            return ReferenceStates(hidden.detach(), keep(head.weight), None if head.bias is None else keep(head.bias))
        return chunked_statistics(
            hidden, head.weight, mb.labels[:, 1:], requested, bias=head.bias, chunk_size=self.chunk_size,
            softcap=self.softcap, reference=reference,
        )


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (by the model's ``_no_split_modules`` class names)."""
    names = set(getattr(hf_model(lm), "_no_split_modules", None) or [])
    return [m for m in lm.modules() if type(m).__name__ in names]


def shard_fsdp2(
    model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None, reshard_root: bool = False
) -> None:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to ``model`` as the root.

    ``reshard_root`` frees the root's gathered parameters after each forward: for a frozen
    reference model, which has no backward that would do it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    inner = model.lm if isinstance(model, CausalLMWithTokenStats) else model
    layers = decoder_layers(inner)
    if not layers:
        raise RuntimeError(f"cannot find decoder layers to shard in {type(hf_model(inner)).__name__}")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if reshard_root else {}))
    model.fsdp_sharded = True  # parameters gathered in forward are freed after it


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A full, CPU state dict; gathers FSDP2 shards (collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (gathered) state dict into ``model``, sharded by FSDP2 or not (collective when sharded)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def merge_lora(state: dict[str, Tensor], scalings: dict[str, float], adapter: str = "default") -> dict[str, Tensor]:
    """Fold LoRA deltas ``W + s * B @ A`` into base weights; return a plain HF state dict."""
    merged: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            if "lora_magnitude" in key or "lora_embedding" in key:
                raise NotImplementedError(f"merging {key.split('.')[-2]} adapters is not supported")
            continue
        if ".base_layer." in key:
            prefix, _, param = key.partition(".base_layer.")
            if param == "weight":
                a = state[f"{prefix}.lora_A.{adapter}.weight"].float()
                b = state[f"{prefix}.lora_B.{adapter}.weight"].float()
                value = (value.float() + scalings[prefix] * (b @ a)).to(value.dtype)
            key = f"{prefix}.{param}"
        merged[key.removeprefix("base_model.model.")] = value
    return merged


def export_hf(
    model: CausalLMWithTokenStats, tokenizer: Any, out_dir: str | Path, *, merge_lora_weights: bool = True,
    is_rank_zero: bool = True, image_processor: Any = None,
) -> Path | None:
    """Write an HF directory (config, safetensors, tokenizer) that transformers and vLLM load.

    Collective under FSDP2: call on every rank; only rank zero writes. LoRA adapters are merged into
    the base weights unless ``merge_lora_weights`` is false, in which case a peft adapter directory
    is written instead. Vision-language models get ``image_processor`` (the one training used, with
    its pixel bounds) or else the base checkpoint's.
    """
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not is_rank_zero and not sharded:
        return None  # replicated weights: rank zero has them all
    state = {k.removeprefix("lm."): v for k, v in full_state_dict(model).items()}
    if not is_rank_zero:
        return None
    final = Path(out_dir)
    try:
        with replacing_dir(final) as out:  # a half-written export never stands where a finished one is read
            inner = hf_model(model.lm)
            is_peft = inner is not model.lm
            if is_peft and not merge_lora_weights:
                from peft import get_peft_model_state_dict

                adapter = get_peft_model_state_dict(model.lm, state_dict=state)
                save_torch_state_dict(adapter, out, filename_pattern="adapter_model{suffix}.safetensors")
                model.lm.peft_config["default"].save_pretrained(out)
            else:
                if is_peft:
                    scalings = {
                        name.removeprefix("lm."): float(m.scaling["default"])
                        for name, m in model.named_modules()
                        if hasattr(m, "scaling") and isinstance(getattr(m, "scaling", None), dict)
                    }
                    state = merge_lora({k: v for k, v in state.items()}, scalings)
                if getattr(inner.config, "tie_word_embeddings", False):
                    state.pop("lm_head.weight", None)
                save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, out)
                inner.config.save_pretrained(out)
                if getattr(inner, "generation_config", None) is not None:
                    inner.generation_config.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
            name = str(getattr(inner.config, "_name_or_path", "") or "")
            if image_processor is not None:  # as trained: min_pixels / max_pixels of the data module
                image_processor.save_pretrained(out)
            elif (Path(name) / "preprocessor_config.json").is_file():  # vision-language: the base image processor
                shutil.copy2(Path(name) / "preprocessor_config.json", out / "preprocessor_config.json")
            elif name and getattr(inner.config, "vision_config", None) is not None:  # a hub id: its cached processor
                from transformers import AutoImageProcessor

                try:
                    AutoImageProcessor.from_pretrained(name).save_pretrained(out)
                except (OSError, ValueError) as e:
                    warnings.warn(f"export to {final}: no image processor saved ({e}); image prompts will not load it",
                                  stacklevel=2)
            (out / "dft_lightning.json").write_text(json.dumps({"merged_lora": is_peft and merge_lora_weights}) + "\n")
    except OSError as e:
        raise StorageError(f"HF export to {final} failed ({e.strerror or e}); any earlier export there is kept, "
                           "and nothing partial was left") from e
    return final


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off and in eval mode (the default reference model)."""
    import copy

    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def adapter_disabled(lm: nn.Module):
    """Context in which a peft model computes with its adapters off (the base model)."""
    return lm.disable_adapter() if hasattr(lm, "disable_adapter") else nullcontext()
