"""Write a reference model's target log-probs for a data config once, so training skips the reference forward.

Usage::

    python tools/precompute_reference.py --config conf/tiny.yaml --output runs/ref/tiny.pt
    python -m dft_lightning fit --config conf/tiny.yaml --model.objective.class_path=dft_lightning.objectives.IWSFT \\
        --model.reference=precomputed:runs/ref/tiny.pt

The configs (and any ``--data...`` / ``--model...`` overrides after them) are read exactly as ``fit`` reads
them: the data module is set up (its tokenised rows come from the tokenised-row cache when they are there)
and every row of its splits (train, and val / test when present) is run through the reference model under
``no_grad`` in length-sorted micro-batches. The reference is ``--reference``, else the config's
``model.reference`` when it names a model, else ``model.pretrained`` (the frozen starting model);
``model.dtype``, ``attn_implementation``, ``chunk_size``, ``fsdp_param_dtype`` and ``trainer.precision`` are
taken from the config, so the values are the ones a live reference would give. What is written and checked:
``dft_lightning.precomputed``.

Not handled here: image rows, several processes (one process runs the whole data set).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import dft_lightning  # noqa: F401
except ModuleNotFoundError:  # a checkout without an installed package
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import torch

    from dft_lightning.cli import build_cli
    from dft_lightning.errors import UserError
    from dft_lightning.precomputed import precompute, precomputed_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments (--config FILE, --data.*, --model.*) go to the fit CLI.")
    parser.add_argument("--output", required=True, help="the file to write (.pt)")
    parser.add_argument("--reference", help="reference model spec (default: model.reference, else model.pretrained)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward (default: data.micro_batch_size)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    args, cli_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cli = build_cli([*cli_args, "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
        module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
        hp = module.hparams
        reference = args.reference or (hp.reference if hp.reference and precomputed_path(hp.reference) is None
                                       else hp.pretrained)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        datamodule.prepare_data()
        datamodule.setup("fit")
        started = time.perf_counter()
        plugin = trainer.precision_plugin
        out = precompute(
            datamodule, reference, args.output, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            chunk_size=hp.chunk_size, micro_batch_size=args.micro_batch_size or datamodule.micro_batch_size,
            device=device, forward_context=plugin.forward_context, precision=str(trainer.precision),
            param_dtype=hp.fsdp_param_dtype,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = sum(len(r) for r in datamodule.datasets.values())
    print(f"wrote reference log-probs of {reference} for {rows} rows to {out} ({time.perf_counter() - started:.0f} s); "
          f"train with --model.reference=precomputed:{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
