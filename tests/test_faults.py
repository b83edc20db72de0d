"""Logger and data faults: W&B unreachable, data-loader workers that die, rows of the wrong shape."""

from __future__ import annotations

import os
import re
import signal
import time
import warnings

import pytest

from dft_lightning.cli import build_cli, main
from dft_lightning.data.demo import DemoMathDataModule
from tests.conftest import REPO, read_metrics, write_rows

TINY = str(REPO / "conf" / "tiny.yaml")
WANDB_FALLBACK = "W&B: no online run"


@pytest.mark.parametrize("api_key", [None, pytest.param("k" * 40, marks=pytest.mark.slow)],
                         ids=["no API key", "an API key but no network"])
def test_wandb_online_without_credentials_or_network_falls_back_to_offline_and_training_goes_on(
    tmp_path, monkeypatch, api_key
):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if api_key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(f"""
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: "{tmp_path}", name: csv}}
    - class_path: lightning.pytorch.loggers.WandbLogger
      init_args: {{save_dir: "{tmp_path}", project: dft-lightning-test, name: fallback}}
""")
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(["fit", "--config", TINY, "--config", str(loggers), f"--trainer.default_root_dir={tmp_path}",
                         f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.num_train=16",
                         "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                         "--trainer.enable_progress_bar=false"])
    elapsed = time.monotonic() - started
    import wandb

    wandb.finish()
    assert cli.trainer.global_step == 2
    assert elapsed < 60, f"{elapsed:.0f} s: the fallback did not come within a bounded wait"
    fallbacks = [str(w.message) for w in caught if WANDB_FALLBACK in str(w.message)]
    assert len(fallbacks) == 1, fallbacks
    assert ("No API key" if api_key is None else "127.0.0.1:9") in fallbacks[0]
    rows = read_metrics(tmp_path / "csv")
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1]  # every step's line
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), "no offline run was written"


def worker_rows(tmp_path, tiny_dir, **settings):
    from dft_lightning.data.module import ChatDataModule

    rows = write_rows(tmp_path / "train.jsonl", [{"prompt": f"{i} + 1?", "response": f"{i + 1}"} for i in range(12)])
    dm = ChatDataModule(train=str(rows), tokenizer=str(tiny_dir), batch_size=2, micro_batch_size=2, max_length=256,
                        cache=False, **settings)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_data_loader_worker_that_dies_is_one_error_naming_the_worker_and_its_rows(tmp_path, tiny_dir, monkeypatch,
                                                                                     how):
    from dft_lightning.data.batching import StepCollator
    from dft_lightning.data.workers import WorkerDiedError, describe_worker_failure

    dm = worker_rows(tmp_path, tiny_dir, num_workers=2)
    original = StepCollator.__call__

    def dying(self, rows):  # runs in the worker process (forked: it sees this patch)
        if any(r.get("row_id") == "train.jsonl:5" for r in rows):
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, rows)

    monkeypatch.setattr(StepCollator, "__call__", dying)
    loader = dm.train_dataloader()
    batches = iter(loader)
    with pytest.raises(WorkerDiedError) as info:
        for _ in batches:
            pass
    message = str(info.value)
    ending = "exited with status 3" if how == "exit" else "was killed by signal SIGKILL"
    assert re.fullmatch(rf"data loader worker [01] \(pid (\d+)\) {ending}( \(often [^)]*\))? while building the "
                        r"steps of rows [^;]*train\.jsonl:5[^;]*; rerun with data\.num_workers=0 to see the error in "
                        r"the main process", message), message
    pid = int(re.search(r"pid (\d+)", message).group(1))
    # the same line when PyTorch's SIGCHLD handler raises elsewhere in the main process (the CLI translates it)
    signalled = RuntimeError(f"DataLoader worker (pid {pid}) exited unexpectedly with exit code 3. Details are lost")
    assert describe_worker_failure(signalled) == message
    # ... and when code it interrupted wrapped it (inspect raises TypeError('unsupported callable') from it)
    try:
        try:
            raise signalled
        except RuntimeError as e:
            raise TypeError("unsupported callable") from e
    except TypeError as wrapped:
        assert describe_worker_failure(wrapped) == message
    assert describe_worker_failure(RuntimeError("something else")) is None
    del batches


def test_a_guarded_loader_keeps_only_the_steps_in_flight(tmp_path, tiny_dir):
    dm = worker_rows(tmp_path, tiny_dir, num_workers=2)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    steps = 0
    for _ in iterator:
        steps += 1
        assert len(iterator._indices) <= 2 * loader.prefetch_factor  # not one entry per step of the epoch
    assert steps == 6 and not iterator._indices


class DyingWorkerData(DemoMathDataModule):
    """The demo data whose loader worker is killed (SIGKILL, as by the out-of-memory killer) when it collates the
    step holding row ``train.jsonl:9``."""

    def _loader(self, *args, **kwargs):
        loader = super()._loader(*args, **kwargs)
        collate = loader.collate_fn

        def dying(rows):
            if any(r.get("row_id") == "train.jsonl:9" for r in rows):
                os.kill(os.getpid(), signal.SIGKILL)
            return collate(rows)

        loader.collate_fn = dying
        return loader


def test_a_worker_killed_during_training_is_one_line_from_the_cli(tmp_path, capsys):
    """Through the CLI: wherever PyTorch's report reaches the main process (often inside the training step, from
    its SIGCHLD handler), the run ends with the one line, exit status 1, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}",
              "--data=tests.test_faults.DyingWorkerData", f"--data.init_args.data_dir={tmp_path / 'data'}",
              "--data.init_args.num_workers=2",
              "--data.init_args.num_train=32", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: data loader worker [01] \(pid \d+\) was killed by signal SIGKILL \(often the kernel's "
                        r"out-of-memory killer\) while building the steps of rows .*; rerun with data\.num_workers=0 "
                        r"to see the error in the main process", last), last


def test_rows_of_the_wrong_shape_are_counted_drops_and_training_goes_on(tmp_path, tiny_dir):
    """Valid JSON, wrong shape: a list, a number, a string, messages that are not a list or hold non-objects, a
    prompt that is not text; each is a counted drop named in the report, the good rows train a whole epoch."""
    good = [{"prompt": f"{i} + 1?", "response": f"{i + 1}"} for i in range(8)]
    bad = [["a", "list"], 7, "text", {"messages": "not a list"}, {"messages": [1, 2]},
           {"messages": {"role": "user"}}, {"prompt": ["not", "text"], "response": "x"}, None]
    rows = write_rows(tmp_path / "train.jsonl", [*good[:4], *bad, *good[4:]], extra_lines=('{"broken": ',))
    args = ["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}",
            "--data=dft_lightning.data.ChatDataModule",
            f"--data.init_args.train={rows}", "--data.init_args.batch_size=4", "--data.init_args.micro_batch_size=2",
            "--data.init_args.max_length=256", "--data.init_args.num_workers=1", "--trainer.max_epochs=1",
            "--trainer.max_steps=-1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    cli = build_cli(args)
    report = cli.datamodule.reports["train"]
    assert cli.trainer.global_step == 2  # 8 good rows, 4 per step: the whole epoch ran
    assert report.read == 17 and report.kept == 8
    assert dict(report.dropped) == {"not_an_object": 4, "bad_messages": 3, "bad_type": 1, "malformed_json": 1}
    summary = report.summary()
    assert "dropped not_an_object: 4, e.g. rows train.jsonl:5, train.jsonl:6, train.jsonl:7, train.jsonl:12" in summary
    assert "dropped malformed_json: 1, e.g. rows train.jsonl:17" in summary
    logged = read_metrics(tmp_path)[0]
    assert float(logged["data/train/dropped_not_an_object"]) == 4
