"""User mistakes in a run's config, answered before anything heavy starts, each by one line naming the key.

* ``OneLineParser``: the CLI's argument parser; its errors (an unknown key, a class path that names nothing, an
  argument a class does not take) become one ``UserError`` line instead of the usage text and a nested report.
* ``instantiation_error``: a class's own constructor refusing a value (``DFT.min_weight must be in [0, 1]``),
  which jsonargparse wraps in a report of every type it tried, back to that one line with the key.
* ``check_before_run``: what the parser cannot see, checked before ``fit`` / ``validate`` / ``test`` start
  processes or load weights: ``trainer.precision`` 16 (fp16 needs loss scaling, which the training step does
  not do), ``--ckpt_path`` to no file, ``data.batch_size`` against the number of devices (the rule: every
  device takes ``batch_size / devices`` rows per optimizer step, in micro-batches of at most
  ``data.micro_batch_size``, the last one smaller when it does not divide; so ``batch_size`` must be a multiple
  of ``devices x num_nodes``, ``micro_batch_size`` need not divide anything), ``data.max_length`` above the
  model's context (``max_position_embeddings``). It then starts the W&B runs (``dft_lightning.loggers``).
* ``check_same_model``: a checkpoint of another model (a weight of another shape, or not one weight of this
  model), called when a checkpoint is restored; partly different keys (LoRA adapters, a reference's shards) are
  left to the strategy's loading.

Not handled here: mistakes that only show in the data (``dft_lightning.data``) or the model files
(``dft_lightning.pretrained``); those raise their own ``UserError`` where they are found.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from dft_lightning.errors import MissingFileError, UserError

SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class OneLineParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one ``UserError`` line (the CLI prints it, exit status 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parse attempt: jsonargparse handles it
            super().error(message, ex)
        raise UserError(condense(message)) from None


def _first_item(text: str) -> str:
    """The first ``- ...`` entry of an ``Errors:`` list (with its continuation lines), else the first line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- "):
            parts = [line.strip()[2:].strip()]
            indent = len(line) - len(line.lstrip())
            for more in lines[i + 1 :]:
                if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                    break
                parts.append(more.strip())
            return " ".join(p.rstrip(":") if j == 0 and len(parts) > 1 else p for j, p in enumerate(parts))
    return next((line.strip() for line in lines if line.strip()), text)


def _similar_classes(class_path: str) -> str:
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - the module itself is wrong: no suggestion
        return ""
    names = [n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(f'{module_name}.{c}' for c in close)}?" if close else ""


def _accepted(class_path: str) -> str:
    module_name, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters
    except Exception:  # noqa: BLE001 - cannot introspect: no list
        return ""
    names = [p for p in parameters if p not in ("self", "args", "kwargs")]
    return f"; it takes {', '.join(names)}" if names else "; it takes no arguments"


def condense(message: str) -> str:
    """One line (key, what is wrong, what to do) from a jsonargparse error message."""
    text = message.strip()
    unknown = re.match(r"unrecognized arguments: (.*)", text, re.S)
    if unknown:
        keys = [a.split("=")[0].lstrip("-") for a in unknown.group(1).split() if a.startswith("--")]
        named = ", ".join(keys) or unknown.group(1).strip()
        return f"unknown key {named}: not a setting of this command; --help lists the keys"
    key_match = re.match(r'Parser key "([^"]+)":', text) or re.match(r"Problem with given key '?([\w.]+)'?", text)
    key = key_match.group(1) if key_match else None
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", text)
    if problem:
        class_path, reason = problem.group(1), problem.group(2).strip()
        option = re.match(r"Option '([^']+)' is not accepted", reason)
        if option:
            return (f"unknown key {key}.init_args.{option.group(1)}: {class_path} has no argument "
                    f"{option.group(1)!r}{_accepted(class_path)}")
        if "has no attribute" in reason or "No module named" in reason or "import" in reason.lower():
            return f"{key}: no class {class_path} ({reason}){_similar_classes(class_path)}"
        nested = re.match(r'Parser key "([^"]+)":', reason)
        if nested:  # a value of one of the class's arguments
            after = text[problem.end():].strip()
            detail = after.splitlines()[0].strip() if after else reason
            return f"{key}.init_args.{nested.group(1)}: {detail}"
        return f"{key}: {class_path}: {reason}"
    missing_file = re.search(r"[Uu]nable to load config .*?'([^']+)'|file does not exist: (\S+)", text)
    if missing_file and "--config" in text:
        return f"--config {missing_file.group(1) or missing_file.group(2)}: no such file"
    rest = text[key_match.end():].strip() if key_match else text
    detail = _first_item(rest)
    if key == "config" and detail.startswith("File does not exist"):
        return f"--config: {detail[0].lower()}{detail[1:]}"
    return f"{key}: {detail}" if key else detail


def _find_key(config: Any, class_path: str, prefix: str = "") -> str | None:
    """The dotted key under which ``config`` (a namespace or dict) has ``class_path: <class_path>``."""
    items = vars(config).items() if hasattr(config, "__dict__") else config.items() if isinstance(config, dict) else ()
    for name, value in items:
        if name.startswith("__"):
            continue
        if name == "class_path" and value == class_path:
            return prefix.rstrip(".")
        if hasattr(value, "__dict__") or isinstance(value, dict):
            found = _find_key(value, class_path, f"{prefix}{name}.")
            if found:
                return found
    return None


def instantiation_error(error: ValueError, config: Any) -> UserError:
    """The constructor's own message, with the key of the class it refused a value for."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    given = re.search(r"class_path='([^']+)'", str(error))
    key = _find_key(config, given.group(1)) if given else None
    if key and key.split(".", 1)[0] in ("fit", "validate", "test", "predict"):
        key = key.split(".", 1)[1] if "." in key else None
    reason = str(cause).strip().splitlines()[0] if cause is not error else _first_item(str(error))
    return UserError(f"{key}: {reason}" if key else reason)


# -- before a subcommand runs ---------------------------------------------------------------------------------------
def _check_precision(precision: Any) -> None:
    if str(precision) in ("16", "16-mixed", "16-true"):
        raise UserError(f"trainer.precision={precision} is not supported: fp16 needs loss scaling, which the "
                        "training step does not do; use bf16-mixed (or 32-true)")


def _check_ckpt_path(ckpt_path: Any) -> None:
    if ckpt_path is None or str(ckpt_path) in SPECIAL_CKPT_PATHS:
        return
    if not Path(str(ckpt_path)).expanduser().exists():
        raise MissingFileError(f"--ckpt_path={ckpt_path}: no such file; give a checkpoint written by a run "
                               "(<run dir>/checkpoints/*.ckpt) or leave it out to start from model.pretrained")


def _check_batch(datamodule: Any, world_size: int) -> None:
    batch = getattr(datamodule, "batch_size", None)
    if batch is None or world_size <= 1 or batch % world_size == 0:
        return
    raise UserError(
        f"data.batch_size={batch} is not a multiple of the {world_size} devices (trainer.devices x "
        f"trainer.num_nodes): each device takes data.batch_size / devices rows per step (in micro-batches of at "
        f"most data.micro_batch_size); set data.batch_size to a multiple of {world_size}"
    )


def model_context(pretrained: str) -> int | None:
    """``max_position_embeddings`` of ``pretrained`` (its text model's for a vision-language one), if known."""
    from transformers import AutoConfig

    from dft_lightning.pretrained import resolve_pretrained

    try:
        config = AutoConfig.from_pretrained(resolve_pretrained(pretrained))
    except Exception:  # noqa: BLE001 - an unloadable model is reported where it is loaded
        return None
    for part in (config, getattr(config, "text_config", None)):
        value = getattr(part, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_context(datamodule: Any, module: Any) -> None:
    pretrained = getattr(module, "pretrained", None)
    lengths = {"data.max_length": getattr(datamodule, "max_length", None)}
    if getattr(datamodule, "packing", False):
        lengths["data.pack_length"] = getattr(datamodule, "pack_length", None)
    lengths = {k: v for k, v in lengths.items() if isinstance(v, int)}
    if not pretrained or not lengths:
        return
    context = model_context(str(pretrained))
    for key, value in lengths.items():
        if context is not None and value > context:
            raise UserError(f"{key}={value} is above the context of model.pretrained={pretrained!r} "
                            f"(max_position_embeddings={context}); set {key} to at most {context}")


def check_before_run(cli: Any, subcommand: str) -> None:
    """The checks of the module docstring for ``cli``'s ``subcommand``, then the W&B runs' start."""
    from dft_lightning.loggers import start_wandb

    config = cli.config.get(subcommand, cli.config) if hasattr(cli.config, "get") else cli.config
    _check_precision(config.get("trainer.precision") if hasattr(config, "get") else None)
    _check_ckpt_path(config.get("ckpt_path") if hasattr(config, "get") else None)
    if cli.datamodule is not None:
        if subcommand == "fit":
            _check_batch(cli.datamodule, cli.trainer.world_size)
        _check_context(cli.datamodule, cli.model)
    start_wandb(cli.trainer.loggers)


def check_same_model(module: Any, checkpoint: dict[str, Any], path: Any) -> None:
    """Raise one line when ``checkpoint`` holds the weights of another model than ``module``'s."""
    theirs = checkpoint.get("state_dict")
    if not isinstance(theirs, dict) or not theirs:
        return  # a sharded (directory) checkpoint or one without weights: the strategy loads it
    own = module.state_dict()
    trained_from = (checkpoint.get("hyper_parameters") or {}).get("pretrained")
    problem = None
    for key, value in theirs.items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            problem = f"{key} is {list(value.shape)} there, {list(own[key].shape)} here"
            break
    if problem is None and own and not any(k in own for k in theirs):  # not one weight in common
        problem = f"none of its {len(theirs)} weights is this model's, e.g. {next(iter(theirs))}"
    if problem:
        origin = f"trained from {trained_from!r}; " if trained_from else ""
        pretrained = getattr(module, "pretrained", None)
        raise UserError(f"--ckpt_path={path}: a checkpoint of another model ({origin}{problem}); give a checkpoint "
                        f"of model.pretrained={pretrained!r} or set model.pretrained to the one it was trained from")
