"""tools/plot_curves.py: several runs' CSV logs (and W&B offline runs) in one PNG, one panel per metric."""

from __future__ import annotations

import numpy as np
import plot_curves
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image


def write_csv_run(root, name, curve):
    """A Lightning CSVLogger run: train/nll every step, two benchmarks every 5 steps (as the callbacks log them)."""
    logger = CSVLogger(root, name=name)
    for step in range(11):
        logger.log_metrics({"train/nll": curve(step), "train/lr": 1e-4}, step=step)
        if step % 5 == 0:
            logger.log_metrics({"eval/math500/avg@16": 0.1 + step / 100, "eval/amc23/avg@16": step / 200}, step=step)
    logger.save()
    return root / name


def test_two_csv_logs_one_panel_per_metric_and_a_png(tmp_path):
    dft = write_csv_run(tmp_path, "dft", lambda s: 2.0 - 0.1 * s)
    sft = write_csv_run(tmp_path, "sft", lambda s: 2.0 - 0.05 * s)
    out = tmp_path / "curves.png"
    fig, axes = plot_curves.main([f"DFT={dft}", f"SFT={sft}", "--metric", "eval/*/avg@*", "--metric", "train/nll",
                                  "--out", str(out)])
    assert [ax.get_title() for ax in axes] == ["eval/amc23/avg@16", "eval/math500/avg@16", "train/nll"]
    assert len(fig.axes) == 3
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["DFT", "SFT"]
    nll_dft, nll_sft = axes[2].get_lines()
    assert list(nll_dft.get_xdata()) == list(range(11))
    assert np.allclose(nll_dft.get_ydata(), [2.0 - 0.1 * s for s in range(11)])
    assert np.allclose(nll_sft.get_ydata(), [2.0 - 0.05 * s for s in range(11)])
    assert list(axes[1].get_lines()[0].get_xdata()) == [0, 5, 10]
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[1] > 900 and image.std() > 10
    assert (np.abs(image - (255, 127, 14)).sum(-1) < 30).sum() > 100  # the second run's colour is drawn

    # smoothing keeps the raw points faint beside the average; the first point is not pulled to zero
    _, axes = plot_curves.main([f"DFT={dft}", "--metric", "train/nll", "--smooth", "0.5", "--out", str(out)])
    raw, average = axes[0].get_lines()
    assert average.get_ydata()[0] == pytest.approx(2.0) and average.get_ydata()[-1] > raw.get_ydata()[-1]


def test_a_folder_of_runs_and_a_wandb_offline_run(tmp_path, monkeypatch):
    import wandb

    write_csv_run(tmp_path / "sweep", "a", lambda s: 1.0 / (s + 1))
    write_csv_run(tmp_path / "sweep", "b", lambda s: 2.0 / (s + 1))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="curves-test", dir=str(tmp_path), mode="offline")
    for step in range(0, 8, 2):  # Lightning's WandbLogger adds trainer/global_step to every row
        run.log({"train/nll": 3.0 - step / 10, "trainer/global_step": step})
    run.finish()
    (wandb_dir,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    _, axes = plot_curves.main([str(tmp_path / "sweep"), f"wb={wandb_dir}", "--metric", "train/nll",
                                "--out", str(tmp_path / "c.png")])
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert sorted(lines) == [f"{tmp_path / 'sweep'}/a/version_0", f"{tmp_path / 'sweep'}/b/version_0", "wb"]
    assert list(lines["wb"].get_xdata()) == [0, 2, 4, 6]
    assert np.allclose(lines["wb"].get_ydata(), [3.0, 2.8, 2.6, 2.4])


def test_unknown_metrics_and_paths_are_one_line_errors(tmp_path, capsys):
    from instruments_common import run_main

    run = write_csv_run(tmp_path, "r", lambda s: 1.0)
    with pytest.raises(SystemExit):
        run_main(plot_curves.main, [str(run), "--metric", "val/nosuch", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no metric matches ['val/nosuch']; the runs have: eval/amc23/avg@16")
    assert "\n" not in err
    with pytest.raises(SystemExit):
        run_main(plot_curves.main, [str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert capsys.readouterr().err.strip().endswith("missing: no such file or directory")
