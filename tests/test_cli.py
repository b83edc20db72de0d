"""End to end through the CLI on the tiny Qwen2: training works, configs compose, progress is plain (user mistakes:
tests/test_user_errors.py)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from dft_lightning.callbacks import PlainProgressBar
from dft_lightning.cli import build_cli
from tests.conftest import REPO, read_metrics, run_cli, series

TINY = str(REPO / "conf" / "tiny.yaml")


def fit(tmp_path, *extra, check=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = run_cli(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}",
                      f"--data.init_args.data_dir={tmp_path / 'data'}", *extra], cwd=tmp_path)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fit_learns_exports_and_reloads(tmp_path, tiny_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dft_lightning.module import FineTuneModule

    fit(tmp_path, "--trainer.max_steps=24", "--model.objective.class_path=dft_lightning.objectives.SFT",
        "--export.at_end=true", "--trainer.enable_checkpointing=true", "--data.init_args.num_train=96")
    rows = read_metrics(tmp_path)
    nll = series(rows, "train/nll")
    assert len(nll) == 24
    assert sum(nll[-4:]) / 4 < sum(nll[:4]) / 4 - 0.5, nll  # a learnable set: loss clearly falls
    val = series(rows, "val/nll")
    assert val and val[-1] < 6.0
    assert series(rows, "train/tokens_per_s")[-1] > 0 and series(rows, "train/grad_norm")

    export = next(tmp_path.rglob("hf/final"))
    start = load_file(str(tiny_dir / "model.safetensors"))
    trained = load_file(str(export / "model.safetensors"))
    assert start.keys() == trained.keys()
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(changed) == len(start)  # every tensor moved

    ckpt = next(tmp_path.rglob("*.ckpt"))
    module = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu")
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    module.model.eval()
    ids = torch.tensor([[3, 40, 41, 7, 100, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, module.model.lm(input_ids=ids).logits)


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    common = ["--trainer.max_steps=6", "--data.init_args.num_train=32", "--export.at_end=true",
              "--trainer.enable_checkpointing=true", "--trainer.limit_val_batches=0"]
    checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1",
                   f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    fit(tmp_path / "straight", *common, *checkpoints)  # 4 steps per epoch: step 3 is mid-epoch
    mid = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert mid.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    fit(tmp_path / "resumed", *common, f"--ckpt_path={mid}")
    straight = load_file(str(next((tmp_path / "straight").rglob("hf/final")) / "model.safetensors"))
    resumed = load_file(str(next((tmp_path / "resumed").rglob("hf/final")) / "model.safetensors"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("objective", ["SFT", "DFT", "IWSFT"])
@pytest.mark.slow
def test_objective_switch_by_class_path_only(tmp_path, objective):
    fit(tmp_path, "--trainer.max_steps=2", f"--model.objective.class_path=dft_lightning.objectives.{objective}")
    rows = read_metrics(tmp_path)
    loss, nll = series(rows, "train/loss"), series(rows, "train/nll")
    assert len(loss) == 2
    if objective == "SFT":
        assert loss == pytest.approx(nll)
    elif objective == "DFT":
        assert all(a < b / 10 for a, b in zip(loss, nll, strict=True))  # p ~ 1/V at start
        assert series(rows, "dft/weight_mean")
    else:
        assert series(rows, "iw/weight_mean")[0] == pytest.approx(1.0, abs=1e-5)  # policy == reference at start
        assert loss[0] == pytest.approx(nll[0], rel=1e-5)


@pytest.mark.slow
def test_user_objective_outside_the_package(tmp_path):
    (tmp_path / "my_objectives.py").write_text(textwrap.dedent("""
        import torch
        from dft_lightning.objectives import Objective, ObjectiveOutput

        class FocalLike(Objective):
            requires = frozenset({"entropy"})

            def __init__(self, gamma: float = 2.0):
                self.gamma = gamma

            def __call__(self, stats):
                p = torch.exp(stats.logp)
                loss = stats.token_sum((1 - p).detach() ** self.gamma * -stats.logp)
                return ObjectiveOutput(loss, {"focal/entropy": stats.token_mean(stats.entropy.detach())})
    """))
    result = run_cli(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                      f"--data.init_args.data_dir={tmp_path / 'data'}",
                      "--model.objective.class_path=my_objectives.FocalLike", "--model.objective.init_args.gamma=1.5"],
                     cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    entropy = series(read_metrics(tmp_path), "focal/entropy")
    assert len(entropy) == 2 and 5.0 < entropy[0] < 6.3  # near log(512) for a random tiny model


@pytest.mark.slow
def test_validate_test_and_print_config(tmp_path):
    for command in ("validate", "test"):
        result = run_cli([command, "--config", TINY, f"--trainer.default_root_dir={tmp_path / command}",
                          f"--data.init_args.data_dir={tmp_path / 'data'}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{command.replace('validate', 'val')}/nll" in result.stdout
    result = run_cli(["fit", "--config", TINY, "--model.objective.class_path=dft_lightning.objectives.IWSFT",
                      "--model.objective.init_args.max_weight=4", "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: dft_lightning.objectives.IWSFT" in result.stdout and "max_weight: 4" in result.stdout


def test_interpolation_across_config_files(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  lr: 0.002\n  warmup_ratio: 0.0\n")
    (tmp_path / "derived.yaml").write_text(textwrap.dedent("""
        trainer:
          max_steps: 2
          default_root_dir: ${model.pretrained}-runs
        data:
          init_args:
            micro_batch_size: ${data.init_args.batch_size}
    """))
    result = run_cli(["fit", "--config", TINY, "--config", str(tmp_path / "base.yaml"),
                      "--config", str(tmp_path / "derived.yaml"), "--data.init_args.batch_size=4",
                      "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "default_root_dir: tiny:qwen2-runs" in result.stdout
    assert "micro_batch_size: 4" in result.stdout and "lr: 0.002" in result.stdout


def in_process(tmp_path, *extra, run=True):
    """``fit`` through ``build_cli`` in this process (``run=False``: only build it); returns the CLI."""
    args = ["--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_train=16",
            f"--data.init_args.data_dir={tmp_path / 'data'}", "--trainer.num_sanity_val_steps=0", *extra]
    return build_cli(["fit", *args] if run else args, run=run)


def step_lines(out):
    return [line for line in out.splitlines() if line.startswith(("step ", "validation at step "))]


def test_progress_bar_off_or_one_plain_line_per_n_steps_without_a_terminal(tmp_path, capsys):
    cli = in_process(tmp_path, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
                     "--trainer.limit_val_batches=0")
    assert cli.trainer.global_step == 2 and cli.trainer.progress_bar_callback is None
    assert step_lines(capsys.readouterr().out) == []

    cli = in_process(tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=1")
    assert isinstance(cli.trainer.progress_bar_callback, PlainProgressBar)
    out = capsys.readouterr().out
    lines = step_lines(out)
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/3", "3/3"]  # every 10: 1st, last
    assert all(f" {name} " in lines[0] for name in ("loss", "lr", "tokens/s", "elapsed", "eta"))
    assert "validation at step 2: val/loss" in out  # 2 steps per epoch: validated after the first
    assert "\r" not in out

    cli = in_process(tmp_path, "--trainer.callbacks+=dft_lightning.callbacks.PlainProgressBar",
                     "--trainer.callbacks.every_n_steps=2", run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, PlainProgressBar)]
    assert len(bars) == 1 and bars[0].every_n_steps == 2  # a bar in the config replaces the default one
