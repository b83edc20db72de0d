"""Every YAML under conf/ parses; those whose model loads offline instantiate (model included).

Top-level configs are complete experiments; ``conf/overlays/`` holds partial configs that are
checked on top of ``conf/tiny.yaml``.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO

CONF = REPO / "conf"
EXPERIMENTS = sorted(p for p in CONF.rglob("*.yaml") if "overlays" not in p.parts and "eval" not in p.parts)
EVALUATIONS = sorted((CONF / "eval").glob("*.yaml"))
OVERLAYS = sorted((CONF / "overlays").glob("*.yaml"))
OFFLINE_PREFIXES = ("tiny:", "pkg:")


def instantiate(*configs, extra=()):
    from dft_lightning.cli import build_cli

    args: list[str] = []  # run=False: no subcommand
    for config in configs:
        args += ["--config", str(config)]
    return build_cli([*args, *extra], run=False)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONF)))
def test_experiment_config_instantiates(config, tmp_path):
    cli = instantiate(config, extra=[f"--trainer.default_root_dir={tmp_path}"])
    pretrained = cli.model.pretrained
    if not pretrained.startswith(OFFLINE_PREFIXES):
        pytest.skip(f"{pretrained} needs the hub; parsed and instantiated without weights")
    cli.model.configure_model()
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) > 0
    assert cli.datamodule.tokenizer_spec == pretrained


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_parses_on_top_of_tiny(overlay, tmp_path):
    cli = instantiate(CONF / "tiny.yaml", overlay, extra=[f"--trainer.default_root_dir={tmp_path}",
                                                          "--trainer.devices=1"])
    assert cli.trainer is not None and cli.model is not None


@pytest.mark.parametrize("config", EVALUATIONS, ids=lambda p: p.name)
def test_evaluation_config_parses(config):
    from dft_lightning.evaluation.run import BenchmarkSpec, build_parser

    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(["--config", str(config)]))
    assert init.model and init.benchmarks
    for benchmark in init.benchmarks:  # each names a benchmark class that takes its arguments
        BenchmarkSpec.of(benchmark).arguments()


def test_all_configs_are_covered():
    assert {p.name for p in EXPERIMENTS} >= {"demo.yaml", "tiny.yaml"}
    assert OVERLAYS, "conf/overlays is empty"
    assert EVALUATIONS, "conf/eval is empty"
