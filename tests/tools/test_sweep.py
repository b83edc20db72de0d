"""tools/sweep.py: a grid of the tiny config runs to completion, a rerun skips it, the table names the best point."""

from __future__ import annotations

import csv
import json

import pytest
import sweep

from tests.conftest import REPO, read_metrics, series

TINY = str(REPO / "conf" / "tiny.yaml")
OBJECTIVES = "model.objective.class_path=dft_lightning.objectives.DFT,dft_lightning.objectives.SFT"
FAST = ["--set", "trainer.max_steps=2", "--set", "data.init_args.num_train=16", "--set", "data.init_args.num_test=4",
        "--set", "trainer.enable_model_summary=false", "--set", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_a_two_by_two_grid_runs_resumes_and_names_the_best_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", TINY, "--axis", "model.lr=1e-3,3e-3", "--axis", OBJECTIVES, *FAST, "--out", "sw",
            "--metric", "train/nll", "--mode", "min", "--no_progress"]
    result = sweep.main(args)
    points = result["points"]
    assert [p.status for p in points] == ["ran"] * 4
    assert [p.name for p in points] == ["00-lr=0.001-objective=DFT", "01-lr=0.001-objective=SFT",
                                        "02-lr=0.003-objective=DFT", "03-lr=0.003-objective=SFT"]
    finals = {}
    for point in points:
        rows = read_metrics(point.folder)  # each point's own run, under its own folder
        assert series(rows, "train/lr")[0] == pytest.approx(point.values["model.lr"])
        is_dft = point.values["model.objective.class_path"].endswith("DFT")
        assert bool(series(rows, "dft/weight_mean")) == is_dft  # the objective switched per point
        assert len(series(rows, "train/nll")) == 2
        finals[point.name] = series(rows, "train/nll")[-1]
        assert point.metric == pytest.approx(finals[point.name])
        assert json.loads((point.folder / "done.json").read_text())["returncode"] == 0
    best = min(finals, key=finals.get)
    assert result["best"].name == best
    with (tmp_path / "sw" / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table if r["best"] == "1"] == [best]
    assert f"Best point: {best}" in (tmp_path / "sw" / "results.md").read_text()
    assert len(result["figure"].axes) >= 3  # lr and objective line plots, the heatmap (+ its colour bar)

    logs = {p.name: (p.folder / "train.log").stat().st_mtime_ns for p in points}
    again = sweep.main(args)
    assert [p.status for p in again["points"]] == ["skipped"] * 4
    assert {p.name: (p.folder / "train.log").stat().st_mtime_ns for p in again["points"]} == logs
    assert again["best"].name == best


def test_print_and_slurm_launch_lines_and_point_configs_the_cli_accepts(tmp_path, monkeypatch, capsys):
    from dft_lightning.cli import build_cli
    from dft_lightning.objectives import SFT

    monkeypatch.chdir(tmp_path)
    base = ["--config", TINY, "--axis", "data.init_args.batch_size=4,8", "--axis", OBJECTIVES, "--out", "sw",
            "--set", "model.lr=2e-4", "--no_progress"]
    result = sweep.main([*base, "--launch", "print"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "--point" in line]
    assert len(lines) == 4 and all(p.status == "pending" for p in result["points"])
    assert lines[3].endswith(str(tmp_path / "sw" / "03-batch_size=8-objective=SFT"))
    point = result["points"][3]
    monkeypatch.setattr("sys.argv", ["sweep"])  # the CLI parses only the arguments given here
    cli = build_cli(["--config", TINY, "--config", str(point.folder / "point.yaml")], run=False)
    assert isinstance(cli.model.objective, SFT) and cli.model.hparams.lr == pytest.approx(2e-4)
    assert cli.datamodule.batch_size == 8 and cli.trainer.default_root_dir == str(point.folder.resolve())
    sweep.main([*base, "--launch", "slurm", "--sbatch", "--gres=gpu:8 --time=1:00:00"])
    script = (tmp_path / "sw" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gres=gpu:8" in script and "--point" in script
    # a finished marker whose inputs changed does not count as finished
    marker = {"returncode": 0, "fingerprint": sweep.fingerprint(point.folder)}
    (point.folder / "done.json").write_text(json.dumps(marker))
    assert sweep.is_done(point.folder)
    sweep.main([*base, "--set", "trainer.max_steps=3", "--launch", "print"])
    assert not sweep.is_done(point.folder)


def test_bad_axes_are_one_line_errors(tmp_path, capsys):
    from instruments_common import run_main

    for args, message in (
        (["--axis", "model.lr"], "--axis 'model.lr': expected KEY=VALUE"),
        (["--axis", "model.lr=1,1"], "a value is repeated"),
        (["--axis", "model.lr=1", "--set", "model.lr=2"], "model.lr is both an --axis and a --set key"),
    ):
        with pytest.raises(SystemExit):
            run_main(sweep.main, ["--config", TINY, "--out", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
