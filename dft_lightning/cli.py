"""Command line: ``python -m dft_lightning {fit,validate,test} --config conf/....yaml``.

A LightningCLI over ``FineTuneModule`` and any ``ChatDataModule`` subclass (``data.class_path``),
in ``omegaconf+`` mode so ``${...}`` interpolation works across config files and with
command-line overrides (``--model.objective.class_path=dft_lightning.objectives.DFT``). The data's
tokenizer is linked from ``model.pretrained``. The ``export`` group configures the HF-format export
(``HFExport``). Loggers default to CSV plus Weights & Biases, offline when no W&B credentials are
found (``WANDB_MODE`` always wins). The progress bar is Rich's on a terminal and otherwise
``PlainProgressBar`` (one plain line every 10 steps, for batch logs; add it to ``trainer.callbacks``
with ``every_n_steps`` to change that); a progress bar in ``trainer.callbacks`` replaces it and
``trainer.enable_progress_bar: false`` turns it off. Problems in the user's config or data end the run
with a one-line ``error:`` message instead of a traceback, exit status 2 (``dft_lightning.config_checks``: parser
errors, constructor refusals, checks before ``fit`` / ``validate`` / ``test``, which also start the W&B runs with
their offline fallback, ``dft_lightning.loggers``); a data-loader worker that dies is one line too, exit status 1
(``dft_lightning.data.workers``). Checkpoints are written beside their target
and renamed into place (``dft_lightning.checkpointing``: the trainer class and the default checkpoint
plugin); SIGTERM and SLURM's requeue signal save one and stop (``dft_lightning.preemption``).

``python -m dft_lightning evaluate`` is dispatched to ``dft_lightning.evaluation.run``.

Not handled here: launchers (use Lightning's: torchrun,
SLURM, ``trainer.num_nodes``).
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from dft_lightning.callbacks import HFExport, PlainProgressBar
from dft_lightning.checkpointing import AtomicCheckpointIO, Trainer
from dft_lightning.config_checks import OneLineParser, check_before_run, instantiation_error
from dft_lightning.data.module import ChatDataModule
from dft_lightning.errors import UserError
from dft_lightning.module import FineTuneModule
from dft_lightning.preemption import Preemption


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _default_loggers() -> list[dict[str, Any]]:
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "dft"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": "runs", "project": "dft-lightning"}},
    ]


def _progress_bar() -> Any:
    from lightning.pytorch.callbacks import RichProgressBar

    return RichProgressBar() if sys.stdout.isatty() else PlainProgressBar()


class DFTLightningCLI(LightningCLI):
    """LightningCLI with the package's links, export group and defaults."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.pretrained", "data.init_args.tokenizer")
        parser.add_lightning_class_args(HFExport, "export")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with the default progress bar unless the config switches bars off or brings its own,
        the pre-emption callback and, unless the config names a checkpoint plugin, ``AtomicCheckpointIO``."""
        from lightning.fabric.plugins import CheckpointIO
        from lightning.pytorch.callbacks import ProgressBar

        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = kwargs["callbacks"] = [*callbacks, _progress_bar()]
        if not any(isinstance(c, Preemption) for c in callbacks):  # SIGTERM / SLURM requeue: save, then stop
            kwargs["callbacks"] = [*callbacks, Preemption()]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written beside, then renamed
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """The classes; a constructor refusing a value is one line naming the key (``config_checks``)."""
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except ValueError as e:  # jsonargparse's report around a constructor's own ValueError
            raise instantiation_error(e, self.config) from None

    def before_fit(self) -> None:
        check_before_run(self, "fit")

    def before_validate(self) -> None:
        check_before_run(self, "validate")

    def before_test(self) -> None:
        check_before_run(self, "test")


def build_cli(args: list[str] | None = None, run: bool = True) -> DFTLightningCLI:
    """Construct (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # The step sampler resumes mid-epoch by itself (ChatDataModule.train_dataloader).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    if "WANDB_MODE" not in os.environ and not _wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    if not sys.stderr.isatty():  # batch logs: no carriage-return bars from transformers (loading, saving)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return DFTLightningCLI(
        FineTuneModule,
        ChatDataModule,
        trainer_class=Trainer,
        subclass_mode_data=True,
        parser_class=OneLineParser,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,
            "logger": _default_loggers(),
            "log_every_n_steps": 1,
        },
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["evaluate"]:
        from dft_lightning.evaluation.run import main as evaluate_main

        return evaluate_main(argv[1:])
    try:
        build_cli(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # a dead data-loader worker, reported from wherever its signal came (maybe wrapped)
        from dft_lightning.data.workers import describe_worker_failure

        message = describe_worker_failure(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
