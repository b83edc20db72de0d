"""User mistakes through the CLI, in process: each is one ``error:`` line naming the key or file, exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dft_lightning.cli import main
from tests.conftest import REPO, write_rows

TINY = str(REPO / "conf" / "tiny.yaml")
CHAT = ["--data=dft_lightning.data.ChatDataModule", "--data.init_args.batch_size=2", "--data.init_args.max_length=512"]
FIELDS = ["--data.init_args.fields.prompt=problem", "--data.init_args.fields.response=solution"]


def no_template_model(tmp_path, tiny_dir):
    """The tiny model with its tokenizer's chat template taken out (a base model's tokenizer)."""
    copy = tmp_path / "no_template"
    shutil.copytree(tiny_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return [f"--model.pretrained={copy}"]


def csv_file(tmp_path, tiny_dir):
    (tmp_path / "rows.csv").write_text("prompt,response\n1+1?,2\n")
    return [*CHAT, f"--data.init_args.train={tmp_path / 'rows.csv'}"]


def missing_field(tmp_path, tiny_dir):
    rows = write_rows(tmp_path / "rows.jsonl", [{"problem": "1+1?", "answer": "2"}] * 4)
    return [*CHAT, *FIELDS, f"--data.init_args.train={rows}"]


def empty_after_filtering(tmp_path, tiny_dir):
    rows = write_rows(tmp_path / "rows.jsonl", [{"problem": "1+1?", "solution": ""},
                                                {"problem": "2+2?", "solution": "   "}])
    return [*CHAT, *FIELDS, f"--data.init_args.train={rows}"]


def other_models_checkpoint(tmp_path, tiny_dir):
    """A Lightning checkpoint of a model with another vocabulary and width (and no hyper-parameters, which
    LightningCLI would otherwise take over into the config)."""
    import lightning

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.lm.model.embed_tokens.weight": torch.zeros(32, 8)},
                "pytorch-lightning_version": lightning.__version__,
                "epoch": 0, "global_step": 3}, path)
    return [f"--ckpt_path={path}"]


CASES = {
    "unknown key": (["--model.learning_rate=1"],
                    "error: unknown key model.learning_rate: not a setting of this command; --help lists the keys"),
    "unknown objective argument": (["--model.objective.init_args.min_wieght=0.1"],
                                   "error: unknown key model.objective.init_args.min_wieght: "
                                   "dft_lightning.objectives.DFT has no argument 'min_wieght'; it takes min_weight"),
    "misspelled objective class": (["--model.objective.class_path=dft_lightning.objectives.DTF"],
                                   "error: model.objective: no class dft_lightning.objectives.DTF (module "
                                   "'dft_lightning.objectives' has no attribute 'DTF'); did you mean "
                                   "dft_lightning.objectives.DFT"),
    "objective argument out of range": (["--model.objective.init_args.min_weight=-1"],
                                        "error: model.objective: DFT.min_weight must be in [0, 1], got -1.0"),
    "missing model path": (["--model.pretrained=/no/such/dir"],
                           "error: model.pretrained='/no/such/dir': no such directory; give a hub id, a local HF "
                           "directory, a .gguf file, pkg:<package>/<file>.gguf or tiny:qwen2"),
    "unknown tiny model": (["--model.pretrained=tiny:nosuch"],
                           "error: model.pretrained='tiny:nosuch': no such tiny model; known: tiny:qwen2"),
    "hub id without network": (["--model.pretrained=someone/no-such-model"],  # HF_HUB_OFFLINE=1 (conftest)
                               "error: model.pretrained='someone/no-such-model': no tokenizer could be loaded ("),
    "tokenizer without a chat template": (no_template_model, "has no chat template: set data.chat_template to "
                                                             "'plain'"),
    "data file of an unknown format": (csv_file, "rows.csv: unknown data format (.csv); give a .json, .jsonl"),
    "missing data file": ([*CHAT, "--data.init_args.train=/nonexistent/train.jsonl"],
                          "error: data.train: data file not found: /nonexistent/train.jsonl"),
    "missing field": (missing_field, "field 'solution' missing in all 4 rows (row fields: answer, problem); "
                                     "set data.fields"),
    "empty data after filtering": (empty_after_filtering, "no usable rows: 2 read, all dropped (empty_response: 2"),
    "max_length above the model's context": (["--data.init_args.max_length=4096"],
                                             "error: data.max_length=4096 is above the context of "
                                             "model.pretrained='tiny:qwen2' (max_position_embeddings=1024); set "
                                             "data.max_length to at most 1024"),
    "batch_size not a multiple of the devices": (["--trainer.devices=3", "--data.init_args.batch_size=8"],
                                                 "error: data.batch_size=8 is not a multiple of the 3 devices"),
    "negative learning rate": (["--model.lr=-1"], "error: model.lr=-1.0 must be a positive number (paper: 5e-5)"),
    "precision 16-mixed": (["--trainer.precision=16-mixed"],
                           "error: trainer.precision=16-mixed is not supported: fp16 needs loss scaling"),
    "LoRA target modules that match nothing": (["--model.lora={r: 4, target_modules: [no_such_proj]}"],
                                               "error: model.lora.target_modules=['no_such_proj'] match no module "
                                               "of Qwen2ForCausalLM; its linear layers: down_proj, gate_proj"),
    "ckpt_path to a missing file": (["--ckpt_path=/nonexistent/last.ckpt"],
                                    "error: --ckpt_path=/nonexistent/last.ckpt: no such file"),
    "ckpt_path to another model's checkpoint": (
        other_models_checkpoint, "other.ckpt: a checkpoint of another model (model.lm.model.embed_tokens.weight is "
                                 "[32, 8] there, [512, 64] here); give a checkpoint of model.pretrained='tiny:qwen2'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_is_one_line_naming_the_key_and_exit_status_2(case, tmp_path, tiny_dir, capsys):
    extra, expected = CASES[case]
    if callable(extra):
        extra = extra(tmp_path, tiny_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
              f"--data.init_args.data_dir={tmp_path / 'data'}", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert expected in errors[0]
    assert "Traceback" not in err and "usage:" not in err


def test_what_the_chat_template_error_says_to_do_works(tmp_path, tiny_dir):
    """``data.chat_template``: ``plain`` or a ``.jinja`` file render a tokenizer without a template of its own."""
    from dft_lightning.data.chat import PLAIN_TEMPLATE
    from dft_lightning.data.module import ChatDataModule

    model = no_template_model(tmp_path, tiny_dir)[0].split("=", 1)[1]
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "1+1?", "response": "2"}] * 2)
    jinja = tmp_path / "turns.jinja"
    jinja.write_text(PLAIN_TEMPLATE.replace("Assistant:", "Reply:"))
    for choice, marker in (("plain", "Assistant:\n2"), (str(jinja), "Reply:\n2")):
        dm = ChatDataModule(train=str(rows), tokenizer=model, batch_size=2, max_length=128, cache=False,
                            chat_template=choice)
        dm.setup("fit")
        row = dm.datasets["train"][0]
        assert marker in dm.tokenizer.decode(row["input_ids"])
        assert dm.tokenizer.decode([t for t in row["labels"] if t != -100]).startswith("2")
