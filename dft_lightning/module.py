"""``FineTuneModule``: a causal LM, a training objective, AdamW with warm-up + cosine decay.

One training step is one optimizer step: the loader yields this rank's micro-batches of the step
(``dft_lightning.data.batching``), the module counts the step's supervised tokens across ranks,
runs forward/backward per micro-batch with the loss divided by that count (and multiplied by the
number of data-parallel ranks, which average gradients), clips, steps and logs. Gradient
synchronisation is skipped for all but the last micro-batch (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``). Micro-batch size, accumulation and GPU count therefore do not
change the update.

Logged per step: ``train/loss`` (the objective), ``train/nll`` (plain NLL, same scale for every
objective), ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` (supervised), token and
padding counts, and the objective's own diagnostics. The step's accounting (token counts, metric
reduction, the non-finite policy, the statistics hook for callbacks) lives in ``dft_lightning.step``.

Checkpoints also hold the objective (class path and constructor arguments), the tokens seen and the
skipped-step counters. A module built without an objective (``load_from_checkpoint``, or
``validate`` / ``test`` / ``fit --ckpt_path`` with a config that names none) takes the checkpoint's;
an objective named in the config wins, and a difference is reported in one line.

Not handled here: fp16 with loss scaling (use bf16), tensor parallelism.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from dft_lightning import modeling
from dft_lightning.batch import MicroBatch
from dft_lightning.errors import UserError
from dft_lightning.objectives import SFT, Objective, TokenStats, build_objective, objective_spec
from dft_lightning.objectives.base import known_requirements
from dft_lightning.precomputed import PrecomputedReference, check_compatible, precomputed_path
from dft_lightning.pretrained import load_tokenizer
from dft_lightning.reference import (
    ReferenceUpdate,
    Snapshot,
    is_sharded,
    load_shards,
    paired_parameters,
    sharded_state_dict,
)
from dft_lightning.step import NonFinitePolicy, StepMetrics, TokenStatsHook, detached, supervised_counts
from dft_lightning.tokens import STATISTICS, chunked_statistics

CHECKPOINT_KEY = "dft_lightning"
REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class FineTuneModule(L.LightningModule):
    """Fine-tune a causal LM with a pluggable objective.

    Args:
        pretrained: hub id, local HF directory, GGUF file, ``pkg:<package>/<file>.gguf`` or
            ``tiny:qwen2`` (see ``dft_lightning.modeling``).
        objective: the training objective (``SFT``, ``DFT``, ``IWSFT`` or any ``Objective`` class).
        dtype: parameter dtype at load. Keep ``float32`` for full fine-tuning and use
            ``trainer.precision: bf16-mixed`` (or ``fsdp_param_dtype``); ``bfloat16`` weights suit LoRA.
        attn_implementation: transformers attention backend (``sdpa``, ``flash_attention_2``...).
        lora: ``peft.LoraConfig`` arguments (``r``, ``lora_alpha``, ``target_modules``...); full
            fine-tuning when unset.
        gradient_checkpointing: recompute decoder activations in backward.
        reference: reference model for objectives that require one; default: the starting model
            (with LoRA: the base model with adapters switched off, no copy). ``precomputed:<file>``: its
            target log-probs written once by ``tools/precompute_reference.py`` (``dft_lightning.precomputed``),
            carried by the batches; no reference model is loaded or run.
        reference_update: how the reference follows the policy (``dft_lightning.reference.EMA`` or
            ``Snapshot``); default: it stays frozen. Not with LoRA.
        lr: peak learning rate (paper: 5e-5).
        weight_decay: AdamW weight decay on matrices (biases and norms are not decayed).
        betas: AdamW betas.
        warmup_ratio: fraction of the steps with linear warm-up (paper: 0.1).
        min_lr_ratio: cosine decays to ``lr * min_lr_ratio``.
        max_grad_norm: gradient clipping by global norm (paper: 1.0); ``0`` disables.
        chunk_size: supervised tokens projected to the vocabulary at once (memory knob); default:
            sized from the vocabulary so one chunk's logits stay at 256 MiB (``tokens.auto_chunk_size``).
        fsdp_param_dtype: FSDP2 mixed-precision parameter dtype (e.g. ``bfloat16``); reductions in fp32.
        freeze_vision: keep a vision-language model's vision tower frozen (see
            ``modeling.freeze_vision_tower``).
        on_nonfinite: ``raise`` on a non-finite loss or gradient norm (naming the step and rows) or
            ``skip`` the step (counted in ``train/skipped_steps``): parameters, optimizer state and
            schedule stay as they were.
        max_nonfinite_skips: with ``skip``, this many non-finite steps in a row stop the run.
    """

    def __init__(
        self, pretrained: str, objective: Objective | None = None, dtype: str = "float32",
        attn_implementation: str | None = None, lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False, reference: str | None = None,
        reference_update: ReferenceUpdate | None = None, lr: float = 5e-5,
        weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0, max_grad_norm: float = 1.0, chunk_size: int | None = None,
        fsdp_param_dtype: str | None = None, on_nonfinite: str = "raise", max_nonfinite_skips: int = 20,
        freeze_vision: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        _check_settings(lr=lr, weight_decay=weight_decay, betas=betas, warmup_ratio=warmup_ratio,
                        min_lr_ratio=min_lr_ratio, max_grad_norm=max_grad_norm, chunk_size=chunk_size)
        self._objective_named = objective is not None  # else the checkpoint's objective, if any, is restored
        self.objective = objective if objective is not None else SFT()
        _check_requirements(self.objective)
        if on_nonfinite not in ("raise", "skip"):
            raise UserError(f"model.on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if reference_update is not None and lora:
            raise UserError("model.reference_update with model.lora: a LoRA policy's reference is its base model "
                            "(adapters off), which does not move; drop one of the two")
        self.reference_update = reference_update
        self._precomputed = precomputed_path(reference)  # model.reference: precomputed:<file>
        if self._precomputed is not None:
            check_compatible(self.objective, reference_update, reference)
        if isinstance(reference_update, Snapshot) and reference_update.every_n_steps == 1 and not lora:
            rank_zero_warn("model.reference_update: Snapshot(every_n_steps=1) refreshes the reference after every "
                           "step, so it equals the policy at each forward (ratio objectives reduce to SFT); take N > 1")
        self.save_hyperparameters(ignore=["objective", "reference_update"])
        self.pretrained, self.dtype_name = pretrained, dtype
        self.model: modeling.CausalLMWithTokenStats | None = None
        self._reference: modeling.CausalLMWithTokenStats | None = None  # not a submodule: not saved
        self._tokenizer: Any = None
        self.eval_metrics = torch.nn.ModuleDict({
            f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in ("loss", "nll")
        })
        self._step_started: float | None = None
        self._tokens_seen = 0
        if int(max_nonfinite_skips) != max_nonfinite_skips or max_nonfinite_skips < 1:
            raise UserError(f"model.max_nonfinite_skips={max_nonfinite_skips!r} must be a positive integer")
        self.nonfinite = NonFinitePolicy(on_nonfinite, int(max_nonfinite_skips))
        self._metric_keys: list[str] | None = None

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        lm = modeling.load_causal_lm(self.pretrained, hp.dtype, hp.attn_implementation)
        if hp.dtype != "float32" and not hp.lora:
            rank_zero_warn(f"model.dtype={hp.dtype}: AdamW updates full {hp.dtype} weights, and small updates round "
                           "away; prefer float32 weights with trainer.precision=bf16-mixed or model.fsdp_param_dtype")
        reference_lm = None
        if self._needs_reference_model():
            reference_lm = (
                modeling.load_causal_lm(hp.reference, hp.dtype, hp.attn_implementation)
                if hp.reference is not None else modeling.frozen_copy(lm)
            )
        if hp.freeze_vision:
            modeling.freeze_vision_tower(lm)
        if hp.lora:
            lm = modeling.apply_lora(lm, dict(hp.lora))
        if hp.gradient_checkpointing:
            modeling.hf_model(lm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hp.lora:
                modeling.hf_model(lm).enable_input_require_grads()
        self.model = modeling.CausalLMWithTokenStats(lm, hp.chunk_size).train()
        self._setup_objective()
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            modeling.shard_fsdp2(self.model, data_parallel_mesh(mesh), self._fsdp_param_dtype())
        if reference_lm is not None:
            self._set_reference(reference_lm)
            if self.reference_update is not None:  # the same architecture, or say so before the first step
                try:
                    paired_parameters(self._reference, self.model)
                except ValueError as e:
                    raise UserError(f"model.reference_update: {e}") from None

    def _setup_objective(self) -> None:
        """Hand the tokenizer to an objective that wants it (``Objective.setup``; loaded only then)."""
        setup = getattr(type(self.objective), "setup", None)
        if setup is not None and setup is not Objective.setup:
            self.objective.setup(self.tokenizer)

    def _needs_reference_model(self) -> bool:
        """A separate reference model is needed (with LoRA the base model is the policy with adapters off)."""
        hp = self.hparams
        if self._precomputed is not None:
            return False
        requires = self.objective.requires
        wants = "reference" in requires or any(STATISTICS[n].needs_reference for n in requires if n in STATISTICS)
        return wants and (hp.reference is not None or not hp.lora)

    def _fsdp_param_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.hparams.fsdp_param_dtype) if self.hparams.fsdp_param_dtype else None

    def _set_reference(self, reference_lm: torch.nn.Module) -> None:
        reference = modeling.CausalLMWithTokenStats(reference_lm, self.hparams.chunk_size).requires_grad_(False).eval()
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            modeling.shard_fsdp2(reference, data_parallel_mesh(mesh), self._fsdp_param_dtype(), reshard_root=True)
        object.__setattr__(self, "_reference", reference)  # kept out of state_dict, optimizer and DDP

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.pretrained)
        return self._tokenizer

    def export_hf(self, out_dir: str | Path, merge_lora: bool = True) -> Path | None:
        """Write HF weights + tokenizer (collective under FSDP2; rank zero writes), and the data module's
        image processor, with the pixel bounds training used, for vision-language models."""
        assert self.model is not None, "configure_model() has not run"
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return modeling.export_hf(
            self.model, self.tokenizer, out_dir, merge_lora_weights=merge_lora, is_rank_zero=self.global_rank == 0,
            image_processor=getattr(datamodule, "image_processor", None),
        )

    # -- statistics and loss -------------------------------------------------------------------
    def token_stats(self, mb: MicroBatch, num_tokens: Tensor, num_pairs: Tensor | None = None) -> TokenStats:
        assert self.model is not None
        requires = self.objective.requires
        options = getattr(self.objective, "statistic_options", None) or {}
        requested = {name: options.get(name, {}) for name in requires if name in STATISTICS}
        ref_logp = states = None
        if self._precomputed is not None and "reference" in requires:
            ref_logp = self._precomputed_logp(mb)
        elif "reference" in requires or any(STATISTICS[name].needs_reference for name in requested):
            with torch.no_grad():
                ref_logp, states = self._reference_pass(mb, with_states=any(
                    STATISTICS[name].needs_reference for name in requested), logp="reference" in requires)
        out = self.model(mb, requested, states)
        logp, entropy = out.pop("logp"), out.pop("entropy", None)
        return TokenStats(
            logp=logp, mask=mb.target_mask, sequence=mb.sequence_ids[:, 1:], num_tokens=num_tokens,
            ref_logp=ref_logp, entropy=entropy, targets=mb.labels[:, 1:], extra=out, pairs=mb.pairs,
            num_pairs=num_pairs,
        )

    def _precomputed_logp(self, mb: MicroBatch) -> Tensor:
        """``[rows, time - 1]`` reference log-probs the batch carries (``model.reference: precomputed:<file>``)."""
        if mb.ref_logp is None:
            if mb.supervised_tokens() == 0:  # a no-op micro-batch
                return torch.zeros(mb.target_mask.shape, device=mb.labels.device)
            raise UserError(f"model.reference={self.hparams.reference}: rows {mb.row_ids[:3]} carry no precomputed "
                            "reference log-probs (FineTuneModule.setup attaches them to the data module's rows; "
                            "dataloaders passed without a ChatDataModule do not get them)")
        return mb.ref_logp[:, 1:].float()

    def setup(self, stage: str) -> None:
        """With ``model.reference: precomputed:<file>``: attach its values to the data module's rows."""
        if self._precomputed is None:
            return
        reference = PrecomputedReference.load(self._precomputed, self.hparams.reference)
        trainer = getattr(self, "_trainer", None)
        attached = reference.attach(getattr(trainer, "datamodule", None) if trainer is not None else None)
        rank_zero_info(f"[dft_lightning] {reference.describe()}: attached to {attached} rows, no reference model "
                       "is loaded")

    def _reference_pass(self, mb: MicroBatch, *, with_states: bool, logp: bool) -> tuple[Tensor | None, Any]:
        """The reference's log-probs and/or its final states (one forward); with LoRA the policy, adapters off."""
        assert self.model is not None
        reference = self._reference if self._reference is not None else self.model
        if self._reference is not None:
            self._reference.to(self.device)
        context = modeling.adapter_disabled(self.model.lm) if self._reference is None else nullcontext()
        with context:
            if not with_states:
                return reference(mb)["logp"], None
            states = reference(mb, states_only=True)
        if not logp:
            return None, states
        return chunked_statistics(states.hidden, states.weight, mb.labels[:, 1:], bias=states.bias,
                                  chunk_size=reference.chunk_size, softcap=reference.softcap)["logp"], states

    def _sync_context(self, last: bool):
        """No gradient synchronisation before the last micro-batch of a step."""
        if last or self.trainer.world_size == 1:
            return nullcontext()
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return wrapped.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            stack = ExitStack()
            self.model.set_requires_gradient_sync(False)
            stack.callback(self.model.set_requires_gradient_sync, True)
            return stack
        return nullcontext()

    def _all_reduce(self, values: Tensor, op: str = "sum") -> Tensor:
        """``values`` reduced over ranks (``op``: ``sum``, ``max`` or ``min``); unchanged on one process."""
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            values = values.clone()
            dist.all_reduce(values, op=getattr(dist.ReduceOp, REDUCE_OPS[op]))
        return values

    def training_step(self, batch: list[MicroBatch], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        started = self._step_started or time.perf_counter()
        batch = self._equalise_micro_batches(batch)
        local_tokens = supervised_counts(batch, self.device)
        num_tokens, num_pairs = self._step_counts(batch, local_tokens)
        hooks = [cb for cb in self.trainer.callbacks if isinstance(cb, TokenStatsHook)]
        metrics = StepMetrics()
        for i, mb in enumerate(batch):
            with self._sync_context(last=i == len(batch) - 1):
                stats = self.token_stats(mb, num_tokens, num_pairs)
                out = self.objective(stats)
                self.manual_backward(out.loss * self.trainer.world_size)  # ranks' gradients are averaged
            metrics.add("train/loss", out.loss)
            metrics.add("train/nll", stats.token_sum(stats.nll()))
            metrics.add_objective(out.metrics, local_tokens[i] / num_tokens)
            for hook in hooks:
                hook.on_train_token_stats(self.trainer, self, mb, detached(stats))
        self._check_metric_keys(metrics.keys())
        logs = metrics.reduce(self._all_reduce, self.device)
        grad_norm = self._clip_gradients()
        rows = [r for mb in batch for r in mb.row_ids if r is not None]
        if not self.nonfinite.admit(logs["train/loss"], grad_norm, f"step {self.global_step} (rows {rows[:8]})",
                                    warn=rank_zero_warn):
            optimizer.zero_grad(set_to_none=True)
            self.log("train/skipped_steps", float(self.nonfinite.skipped), on_step=True, batch_size=1)
            return
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._update_reference()
        finished = self._step_started = time.perf_counter()
        self._tokens_seen += int(num_tokens)
        logs.update(self._step_logs(batch, num_tokens, lr, grad_norm, finished - started))
        # Values are already reduced over ranks (identical everywhere): no further sync.
        self.log_dict({k: v.detach().float().cpu() for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=1)
        self.log("loss", logs["train/loss"].detach().float().cpu(), prog_bar=True, logger=False, batch_size=1)

    def _step_counts(self, batch: list[MicroBatch], local_tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """The step's supervised tokens and, for pairwise data (``MicroBatch.pairs``), its pairs, over all ranks
        (one collective either way)."""
        if all(mb.pairs is None for mb in batch):
            return self._all_reduce(local_tokens.sum()).clamp_min(1), None
        pairs = torch.tensor(float(sum(mb.num_pairs() for mb in batch)), device=self.device)
        tokens, pairs = self._all_reduce(torch.stack([local_tokens.sum(), pairs]))
        return tokens.clamp_min(1), pairs.clamp_min(1)

    def _update_reference(self) -> None:
        """After an optimizer step: move the reference by ``model.reference_update``, when it is due."""
        rule = self.reference_update
        if rule is not None and self._reference is not None and rule.due(self.global_step):
            rule.update(self._reference, self.model)

    def _step_logs(self, batch: list[MicroBatch], num_tokens: Tensor, lr: float, grad_norm: Tensor,
                   seconds: float) -> dict[str, Tensor]:
        real, padded = self._all_reduce(torch.tensor(
            [float(sum(mb.real_tokens() for mb in batch)), float(sum(mb.padded_tokens() for mb in batch))],
            device=self.device))
        return {
            "train/lr": torch.tensor(lr),
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": num_tokens / max(seconds, 1e-9),
            "train/supervised_tokens": num_tokens,
            "train/tokens_seen": torch.tensor(float(self._tokens_seen)),
            "train/skipped_steps": torch.tensor(float(self.nonfinite.skipped)),
            "train/padding_efficiency": real / padded.clamp_min(1),
            "train/micro_batches": torch.tensor(float(len(batch))),
        }

    def _equalise_micro_batches(self, batch: list[MicroBatch]) -> list[MicroBatch]:
        """Packed steps can give ranks different numbers of rows; every rank must run as many passes.

        Ranks with fewer micro-batches get leading no-op ones (``MicroBatch.no_op``), which run forward
        and backward like the others without changing the gradient.
        """
        if self.trainer.world_size == 1 or not batch[0].packed:
            return batch
        most = int(self._all_reduce(torch.tensor(float(len(batch)), device=self.device), "max"))
        return [MicroBatch.no_op(batch[0])] * (most - len(batch)) + batch

    def _check_metric_keys(self, keys: list[str]) -> None:
        """Ranks must reduce the same metrics (else the collective hangs): checked on the first step."""
        if self._metric_keys is not None or self.trainer.world_size == 1 or not dist.is_initialized():
            self._metric_keys = keys
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        if any(g != keys for g in gathered):
            raise UserError(f"objective {type(self.objective).__name__} returned different metric keys on different "
                            f"ranks ({gathered}); return the same keys on every call")
        self._metric_keys = keys
        rank_zero_info("[dft_lightning] metric keys agree across ranks")

    def _clip_gradients(self) -> Tensor:
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return torch.tensor(0.0)
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach()

    def on_validation_end(self) -> None:
        self._step_started = None  # throughput counts training time only

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()

    def on_fit_start(self) -> None:
        if str(self.trainer.precision) in ("16-mixed", "16", "16-true"):
            raise UserError(f"trainer.precision={self.trainer.precision} is not supported (no loss scaling); "
                            "use bf16-mixed or 32-true")
        reports = getattr(self.trainer.datamodule, "reports", None) if self.trainer.datamodule else None
        if reports and self.global_rank == 0:
            metrics = {k: v for rep in reports.values() for k, v in rep.metrics().items()}
            for logger in self.loggers:
                logger.log_hyperparams({"objective": repr(self.objective)})
                logger.log_metrics(metrics, step=0)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "objective": objective_spec(self.objective), "tokens_seen": self._tokens_seen,
            "nonfinite": self.nonfinite.state_dict(),
        }
        if self.reference_update is not None and self._reference is not None:  # it has moved: keep it
            if is_sharded(checkpoint.get("state_dict")):  # a distributed checkpoint: shards beside the policy's
                checkpoint["state_dict"].update(sharded_state_dict(self._reference))
                checkpoint[CHECKPOINT_KEY]["reference_sharded"] = True
            else:
                checkpoint[CHECKPOINT_KEY]["reference"] = modeling.full_state_dict(self._reference)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from dft_lightning.config_checks import check_same_model

        check_same_model(self, checkpoint, getattr(self._trainer, "ckpt_path", None) if self._trainer else None)
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        self._tokens_seen = int(state.get("tokens_seen", 0))
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        self._restore_objective(state.get("objective"))
        if "reference" in state and self._reference is not None:
            modeling.load_full_state_dict(self._reference, state["reference"])
        elif state.get("reference_sharded") and self._reference is not None:
            load_shards(self._reference, self.trainer.ckpt_path)  # this rank's shards, like the policy's

    def _restore_objective(self, saved: dict[str, Any] | None) -> None:
        """The checkpoint's objective, unless the config names one (then a difference is reported)."""
        if saved is None:
            return
        current = objective_spec(self.objective)
        if self._objective_named:
            if current != saved:
                rank_zero_info(f"[dft_lightning] objective {_describe(current)} from the config replaces the "
                               f"checkpoint's {_describe(saved)}")
            return
        self.objective = build_objective(saved)
        _check_requirements(self.objective)
        if self._precomputed is not None:
            check_compatible(self.objective, self.reference_update, self.hparams.reference)
        self._setup_objective()
        self._objective_named = True
        rank_zero_info(f"[dft_lightning] objective {_describe(saved)} restored from the checkpoint")
        if self.model is not None and self._reference is None and self._needs_reference_model():
            hp = self.hparams  # the reference is the starting model (or model.reference): load it afresh
            self._set_reference(modeling.load_causal_lm(hp.reference or self.pretrained, hp.dtype,
                                                        hp.attn_implementation))

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, batch: list[MicroBatch], split: str) -> None:
        loss, nll = self.eval_metrics[f"{split}_loss"], self.eval_metrics[f"{split}_nll"]
        for mb in batch:
            tokens = mb.target_mask.sum().float()
            stats = self.token_stats(mb, tokens.clamp_min(1))
            loss.update(self.objective(stats).loss.detach(), weight=tokens)
            nll.update(stats.token_sum(stats.nll()).detach(), weight=tokens)
        fitting = self.trainer.state.fn == "fit"  # then to the loggers by _log_evaluation, not by Lightning
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=1, logger=not fitting)
        self.log(f"{split}/nll", nll, on_step=False, on_epoch=True, prog_bar=True, batch_size=1, logger=not fitting)

    def _log_evaluation(self, split: str) -> dict[str, float] | None:
        """The split's loss and NLL, to every logger at ``global_step``: the number of optimizer steps behind the
        weights they measure, the step of ``train/*`` computed on those weights and of the evaluation callback's
        accuracies. (Lightning logs a validation at the end of a training batch one step earlier, so curves
        drawn together would be one step apart.)"""
        metrics = {name: self.eval_metrics[f"{split}_{name}"] for name in ("loss", "nll")}
        if not all(m.update_called for m in metrics.values()):
            return None
        values = {f"{split}/{name}": float(m.compute()) for name, m in metrics.items()}  # synced across ranks
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(values, step=self.trainer.global_step)
        return values

    def on_validation_epoch_end(self) -> None:
        """Log a validation during ``fit``; a full sanity pass (``num_sanity_val_steps: -1``) is the baseline
        before training (or at the resumed step)."""
        trainer = self.trainer
        if trainer.state.fn != "fit" or (trainer.sanity_checking and not math.isinf(trainer.num_sanity_val_steps)):
            return  # validate / test: Lightning logs them (one step); a partial sanity pass: nothing to keep
        values = self._log_evaluation("val")
        if trainer.sanity_checking and values is not None:
            self._baseline = {**values, "step": trainer.global_step}

    def on_fit_end(self) -> None:
        baseline = getattr(self, "_baseline", None)
        final = self.trainer.callback_metrics.get("val/nll")
        if baseline and final is not None:
            when = "before training" if baseline["step"] == 0 else f"at step {baseline['step']} (resumed)"
            rank_zero_info(f"[dft_lightning] held-out val/nll: {baseline['val/nll']:.4f} {when}, "
                           f"{float(final):.4f} after")

    def validation_step(self, batch: list[MicroBatch], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: list[MicroBatch], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise UserError("no trainable parameters (check model.lora.target_modules)")
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total, hp.warmup_ratio, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_settings(**values: Any) -> None:
    """One-line errors for optimisation settings out of range (named as the ``model.`` keys)."""
    rules = {
        "lr": (lambda v: v > 0 and math.isfinite(v), "a positive number (paper: 5e-5)"),
        "weight_decay": (lambda v: v >= 0, "zero or more"),
        "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (paper: 0.1)"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "max_grad_norm": (lambda v: v >= 0, "zero (no clipping) or more (paper: 1.0)"),
        "chunk_size": (lambda v: v is None or v > 0, "a positive number of tokens, or unset"),
    }
    for key, value in values.items():
        ok, what = rules[key]
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise UserError(f"model.{key}={value!r} must be {what}")


def _check_requirements(objective: Any) -> None:
    unknown = set(getattr(objective, "requires", ())) - known_requirements()
    if unknown:
        raise UserError(f"objective {type(objective).__name__} requires unknown statistics {sorted(unknown)}; known: "
                        f"{sorted(known_requirements())}")


def _describe(spec: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items())
    return f"{spec['class_path'].rpartition('.')[2]}({args})"


def data_parallel_mesh(mesh: Any) -> Any:
    """A 1-D mesh over every rank: this package shards with FSDP2 only (no tensor parallelism).

    Lightning's ``ModelParallelStrategy`` defaults to ``tensor_parallel_size = devices per node`` and
    ``data_parallel_size = nodes``; sharding over its ``data_parallel`` dimension alone would leave
    the ranks of a node unsynchronised, so all dimensions are used as one data-parallel dimension.
    """
    if mesh.ndim == 1:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("data_parallel",))


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    """LR multiplier: linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to ``min_ratio``."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
