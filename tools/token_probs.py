"""Token probabilities of one or more models on a data set (the DFT paper's Figure 2).

For every supervised token of a data split, the probability each model gives it, computed through the
training path itself (``FineTuneModule.token_stats``: the same chunked statistics, the same
``MicroBatch``es from the data module's own loader), without gradients. Writes to ``--out``:

- ``token_probs.png``: the distributions overlaid, one colour per model, log-scale counts; left over
  probability (as in the paper), right over log10 probability (the unlikely tail);
- ``token_probs.md``: quantiles, the share of tokens in probability bins, the tokens whose mean
  probability moved most from the first model to each other one (decoded text, mean change, count),
  and each model's most frequent tokens in the lowest bin;
- ``token_probs.json``: the same numbers (summaries as ``dft_lightning.instruments.probability_summary``).

Usage::

    python tools/token_probs.py --config conf/tiny.yaml --model base=tiny:qwen2 \\
        --model dft=runs/tiny/csv/version_0/hf/final --split train --out runs/token_probs

Models: anything ``model.pretrained`` takes (hub id, HF directory such as an export, GGUF, ``tiny:qwen2``)
or a Lightning checkpoint (``.ckpt``, through ``FineTuneModule.load_from_checkpoint``). Data: any fit
config (``--config``, several merged left to right, or a run's saved ``config.yaml``) parsed by the
project's CLI; further ``--data.init_args.*`` (or other) overrides are passed on to it. The data are
tokenised with the config's tokenizer (``model.pretrained``), so the models should share it.

Not handled here: models with different tokenizers, packed rows' record boundaries in the tables
(every supervised token counts once either way), distributed runs (one process, one device).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instruments_common import ToolError, markdown_table, run_main, split_label  # noqa: E402

from dft_lightning.instruments import (  # noqa: E402
    BIN_EDGES,
    QUANTILES,
    probability_summary,
    quantile_key,
    token_probabilities,
)
from dft_lightning.plotting import plot_probabilities  # noqa: E402


# -- models and data -------------------------------------------------------------------------------
def load_model(spec: str, device: str = "cpu", dtype: str = "float32", chunk_size: int | None = None):
    """A ``FineTuneModule`` in eval mode on ``device``: from a ``.ckpt`` file or anything ``model.pretrained`` takes.

    Its objective is SFT (no statistics beyond the target log-prob, no reference model): the
    probabilities do not depend on the objective.
    """
    from dft_lightning.module import FineTuneModule
    from dft_lightning.objectives import SFT

    if spec.endswith(".ckpt"):
        if not Path(spec).is_file():
            raise ToolError(f"--model {spec}: no such checkpoint file")
        module = FineTuneModule.load_from_checkpoint(spec, map_location="cpu", objective=SFT())
    else:
        module = FineTuneModule(spec, objective=SFT(), dtype=dtype, chunk_size=chunk_size)
        module.configure_model()
    return module.to(device).eval()


def build_datamodule(configs: Sequence[str], overrides: Sequence[str] = ()):
    """The data module of a fit config (parsed and instantiated by the project's CLI), set up."""
    from dft_lightning.cli import build_cli

    args = [arg for config in configs for arg in ("--config", str(config))]
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI warns when it also sees this script's own arguments
    try:
        cli = build_cli([*args, *overrides], run=False)
    finally:
        sys.argv = argv
    datamodule = cli.datamodule
    datamodule.setup("validate")  # no batch-size check against the training rows: nothing trains here
    return datamodule


def split_batches(datamodule, split: str, max_rows: int | None = None):
    """The data module's own loader over ``split`` in order, one micro-batch per item (every row once)."""
    if split not in datamodule.datasets:
        raise ToolError(f"--split {split}: the data module has {sorted(datamodule.datasets)}")
    if max_rows is not None:
        datamodule.datasets[split] = datamodule.datasets[split][:max_rows]
    # ChatDataModule._loader (and the vision module's) is what the train/val/test loaders use; here in
    # order, without dropping the last partial batch, one micro-batch per step.
    return datamodule._loader(split, shuffle=False, drop_last=False, global_batch=datamodule.micro_batch_size)


@torch.no_grad()
def _decode(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)]) if tokenizer is not None else str(int(token_id))


def moved_tokens(before: np.ndarray, after: np.ndarray, targets: np.ndarray, tokenizer: Any = None, top: int = 15,
                 min_count: int = 5) -> dict[str, list[dict[str, Any]]]:
    """Token ids whose mean probability rose / fell most from ``before`` to ``after`` (aligned arrays).

    Only ids with at least ``min_count`` occurrences; each entry: id, decoded text, count, mean before,
    mean after, mean change.
    """
    if len(before) != len(after) or len(before) != len(targets):
        raise ToolError("the models saw different numbers of tokens (the data must be the same)")
    if not len(targets):
        return {"rose": [], "fell": []}
    ids, inverse, counts = np.unique(targets, return_inverse=True, return_counts=True)
    mean_before = np.bincount(inverse, weights=before) / counts
    mean_after = np.bincount(inverse, weights=after) / counts
    change = mean_after - mean_before
    eligible = np.flatnonzero(counts >= min_count)

    def entries(order: np.ndarray) -> list[dict[str, Any]]:
        return [{"token_id": int(ids[i]), "text": _decode(tokenizer, ids[i]), "count": int(counts[i]),
                 "mean_before": float(mean_before[i]), "mean_after": float(mean_after[i]),
                 "mean_change": float(change[i])} for i in order]

    by_change = eligible[np.argsort(change[eligible], kind="stable")]
    rose = [i for i in by_change[::-1] if change[i] > 0][:top]
    fell = [i for i in by_change if change[i] < 0][:top]
    return {"rose": entries(np.asarray(rose, dtype=int)), "fell": entries(np.asarray(fell, dtype=int))}


def lowest_bin_tokens(probs: np.ndarray, targets: np.ndarray, tokenizer: Any = None, top: int = 10):
    """The most frequent token ids among tokens in the lowest probability bin (``[0, BIN_EDGES[1])``)."""
    low = probs < BIN_EDGES[1]
    if not low.any():
        return []
    ids, counts = np.unique(targets[low], return_counts=True)
    totals = {int(i): int(c) for i, c in zip(*np.unique(targets, return_counts=True), strict=True)}
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"token_id": int(ids[i]), "text": _decode(tokenizer, ids[i]), "count": int(counts[i]),
             "share_of_its_occurrences": counts[i] / totals[int(ids[i])]} for i in order]


def analyse(results: dict[str, tuple[np.ndarray, np.ndarray]], tokenizer: Any = None, top: int = 15,
            min_count: int = 5) -> dict[str, Any]:
    """Summaries per model, moved tokens from the first model to each other one, lowest-bin tokens."""
    labels = list(results)
    first = labels[0]
    for label in labels[1:]:
        if not np.array_equal(results[label][1], results[first][1]):
            raise ToolError(f"models {first!r} and {label!r} saw different tokens (the data must be the same)")
    return {
        "models": [{"label": label, "summary": probability_summary(probs),
                    "lowest_bin_tokens": lowest_bin_tokens(probs, targets, tokenizer)}
                   for label, (probs, targets) in results.items()],
        "moved": [{"from": first, "to": label,
                   **moved_tokens(results[first][0], results[label][0], results[first][1], tokenizer, top, min_count)}
                  for label in labels[1:]],
    }


# -- output ----------------------------------------------------------------------------------------
plot = plot_probabilities


def _shown(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def report(analysis: dict[str, Any]) -> str:
    """Markdown tables: quantiles, bin shares, moved tokens, lowest-bin tokens."""
    models = analysis["models"]
    q_headers = [quantile_key(q) for q in QUANTILES]
    parts = ["## Quantiles of supervised-token probabilities", markdown_table(
        ["model", "tokens", "mean", *q_headers],
        [[m["label"], m["summary"]["count"], m["summary"]["mean"], *(m["summary"]["quantiles"][k] for k in q_headers)]
         for m in models])]
    labels = [b["label"] for b in models[0]["summary"]["bins"]]
    parts += ["## Share of tokens per probability bin", markdown_table(
        ["model", *labels],
        [[m["label"], *(f"{100 * b['share']:.2f}%" for b in m["summary"]["bins"])] for m in models])]
    for moved in analysis["moved"]:
        for direction in ("rose", "fell"):
            rows = [[_shown(e["text"]), e["token_id"], e["count"], e["mean_before"], e["mean_after"],
                     f"{e['mean_change']:+.4f}"] for e in moved[direction]]
            parts += [f"## Tokens whose mean probability {direction} most: {moved['from']} -> {moved['to']}",
                      markdown_table(["token", "id", "count", moved["from"], moved["to"], "change"], rows)
                      if rows else "(none)"]
    for m in models:
        rows = [[_shown(e["text"]), e["token_id"], e["count"], f"{100 * e['share_of_its_occurrences']:.1f}%"]
                for e in m["lowest_bin_tokens"]]
        parts += [f"## {m['label']}: most frequent tokens below p = {BIN_EDGES[1]:g}",
                  markdown_table(["token", "id", "count", "of its occurrences"], rows) if rows else "(none)"]
    return "\n\n".join(parts) + "\n"


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="[LABEL=]SPEC",
                        help="a model (HF directory, hub id, tiny:qwen2, .gguf or .ckpt); repeat for several; "
                             "the first is the reference for the moved-token tables")
    parser.add_argument("--config", action="append", required=True, help="fit config(s) naming the data")
    parser.add_argument("--split", default="train", help="train, val or test (default: train)")
    parser.add_argument("--max_rows", type=int, default=None, help="first N rows of the split only")
    parser.add_argument("--out", default="runs/token_probs", help="output directory")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="parameter dtype of models loaded from weights")
    parser.add_argument("--chunk_size", type=int, default=None, help="tokens projected to the vocabulary at once")
    parser.add_argument("--top", type=int, default=15, help="tokens per moved-token table")
    parser.add_argument("--min_count", type=int, default=5, help="occurrences a token needs to be listed as moved")
    parser.add_argument("--no_progress", action="store_true", help="no progress lines")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad} (config overrides look like --data.init_args.num_test=8)")
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max_rows must be >= 1")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = [split_label(spec) for spec in args.model]
    if len({label for label, _ in models}) != len(models):
        raise ToolError(f"--model labels must differ: {[label for label, _ in models]}")
    for _, spec in models:
        if spec.endswith(".ckpt") and not Path(spec).is_file():
            raise ToolError(f"--model {spec}: no such checkpoint file")
    datamodule = build_datamodule(args.config, overrides)
    loader = split_batches(datamodule, args.split, args.max_rows)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label, spec in models:
        module = load_model(spec, device, args.dtype, args.chunk_size)
        results[label] = token_probabilities(module, loader, progress=not args.no_progress, description=label)
        del module
    tokenizer = datamodule.tokenizer
    analysis = analyse(results, tokenizer, args.top, args.min_count)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot({label: probs for label, (probs, _) in results.items()}, out / "token_probs.png")
    tokens = len(next(iter(results.values()))[1])
    analysis["data"] = {"configs": list(args.config), "overrides": overrides, "split": args.split,
                        "rows": len(datamodule.datasets[args.split]), "tokens": tokens}
    analysis["models_spec"] = dict(models)
    (out / "token_probs.json").write_text(json.dumps(analysis, indent=2, ensure_ascii=False) + "\n")
    text = report(analysis)
    (out / "token_probs.md").write_text(text)
    print(text)
    print(f"wrote {out / 'token_probs.png'}, {out / 'token_probs.md'} and {out / 'token_probs.json'}")
    return analysis


if __name__ == "__main__":
    run_main(main)
