"""GPU smoke test: a Table 1 config, end to end, on a random-weight model of the real architecture, offline.

    python tools/gpu_smoke.py --out gpu-results/smoke          # a GPU machine: Qwen2.5-Math-1.5B shapes
    python tools/gpu_smoke.py --cpu --out /tmp/smoke             # anywhere: the same path, shrunk, one step

What runs, each stage through the project's own command line, as a user runs it:

1. a model directory: ``tools/assets/qwen25_math_1p5b/config.json`` (the published Qwen2.5-Math-1.5B
   architecture) with random weights, and the shipped small tokenizer (its BOS/EOS/pad ids set in the
   model's config); ``--cpu`` shrinks it to 2 layers of width 64 (same vocabulary and layout);
2. ``python -m dft_lightning fit`` with ``conf/paper/base_math.yaml`` + ``table1_qwen25_math_1p5b.yaml`` +
   the FSDP2 overlay (bf16 compute on GPU), the model swapped for that directory and the data for generated
   rows in NuminaMath-CoT's schema, for ``--steps`` optimizer steps with a sharded checkpoint and the HF export;
3. the export is loaded back with transformers and compared with the trained checkpoint's tensor names;
4. ``python -m dft_lightning evaluate`` with ``conf/eval/math_qwen.yaml`` on the export, the HF engine
   (no vLLM on the machine), two problems per benchmark from files in the Qwen2.5-Math harness layout.

It checks: the fit exits 0 and logs finite ``train/loss`` for every step; the checkpoint and the export exist;
the export loads and has every parameter; the evaluation writes ``summary.json`` with ``eval/<benchmark>/avg@k``
for all five benchmarks. ``<out>/gpu_smoke.json`` has every stage's status and seconds; the exit status is 1
when a stage failed. Not handled: accuracy (the weights are random), vLLM, several GPUs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tools" / "assets" / "qwen25_math_1p5b"
SHRUNK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_window_layers=2)
HARNESS_DIRS = {"math500": "math500", "minerva": "minerva_math", "olympiadbench": "olympiadbench",
                "aime24": "aime24", "amc23": "amc23"}


def build_model(out: Path, cpu: bool) -> Path:
    """The random-weight model directory (config from the assets, shrunk with ``cpu``) with the shipped tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    values = json.loads((ASSETS / "config.json").read_text())
    values.update(SHRUNK if cpu else {}, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cpu else torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target = out / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_data(out: Path, rows: int) -> tuple[Path, Path]:
    """Training rows in NuminaMath-CoT's schema and two problems per math benchmark in the harness's layout."""
    from dft_lightning.data.synthetic import generate

    train = out / "numina.jsonl"
    with train.open("w") as f:
        for r in generate("train", rows, seed=7):
            f.write(json.dumps({"source": "synthetic", "problem": r["problem"], "solution": r["solution"],
                                "messages": []}) + "\n")
    harness = out / "math_eval"
    problems = generate("test", 2, seed=8)
    schemas = {
        "math500": lambda i, p: {"problem": p["problem"], "answer": p["answer"], "unique_id": f"s/{i}"},
        "minerva": lambda i, p: {"problem": p["problem"], "solution": p["solution"], "idx": i},
        "olympiadbench": lambda i, p: {"id": i, "question": p["problem"], "final_answer": [f"${p['answer']}$"]},
        "aime24": lambda i, p: {"id": i, "problem": p["problem"], "answer": p["answer"]},
        "amc23": lambda i, p: {"id": i, "question": p["problem"], "answer": float(p["answer"])},
    }
    for name, folder in HARNESS_DIRS.items():
        (harness / folder).mkdir(parents=True, exist_ok=True)
        with (harness / folder / "test.jsonl").open("w") as f:
            for i, p in enumerate(problems):
                f.write(json.dumps(schemas[name](i, p)) + "\n")
    return train, harness


def command(args: list[str], log: Path, env: dict[str, str], timeout: int) -> tuple[int, str]:
    """Run ``python -m dft_lightning ...``, output to ``log``; (exit status, tail of the log)."""
    with log.open("w") as f:
        f.write(" ".join([sys.executable, "-m", "dft_lightning", *args]) + "\n")
        f.flush()
        try:
            code = subprocess.run([sys.executable, "-m", "dft_lightning", *args], stdout=f, stderr=subprocess.STDOUT,
                                  env=env, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, "".join(log.read_text().splitlines(keepends=True)[-30:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU, shrunk layers, one step (checks the script)")
    parser.add_argument("--out", default="gpu-results/smoke", help="work and report folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3, --cpu 1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per stage")
    args = parser.parse_args(argv)
    steps = args.steps or (1 if args.cpu else 3)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    report: dict = {"cpu": args.cpu, "steps": steps, "stages": {}}
    ok = True

    def stage(name: str, passed: bool, started: float, **details) -> bool:
        nonlocal ok
        report["stages"][name] = {"ok": passed, "seconds": round(time.perf_counter() - started, 1), **details}
        print(f"== {name}: {'ok' if passed else 'FAILED'} ({report['stages'][name]['seconds']} s)", flush=True)
        ok = ok and passed
        return passed

    started = time.perf_counter()
    model = build_model(out, args.cpu)
    batch, micro = (2, 1) if args.cpu else (16, 4)
    train, harness = write_data(out, batch * steps + batch)
    stage("model", True, started, path=str(model))

    started = time.perf_counter()
    root = out / "fit"
    device = (["--trainer.accelerator=cpu", "--trainer.precision=32-true"] if args.cpu else
              ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--model.fsdp_param_dtype=bfloat16"])
    fit = ["fit", "--config", "conf/paper/base_math.yaml", "--config", "conf/paper/table1_qwen25_math_1p5b.yaml",
           "--config", "conf/overlays/fsdp2.yaml", f"--model.pretrained={model}", f"--data.init_args.train={train}",
           "--data.init_args.num_samples=null", f"--data.init_args.batch_size={batch}",
           f"--data.init_args.micro_batch_size={micro}", "--data.init_args.max_length=1024",
           "--data.init_args.cache=false", f"--trainer.max_steps={steps}", "--trainer.devices=1",
           f"--trainer.default_root_dir={root}", "--export.at_end=true", *device]
    code, tail = command(fit, out / "fit.log", env, args.timeout)
    losses = []
    for metrics in sorted(root.rglob("metrics.csv")):
        with metrics.open() as f:
            losses += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss") not in (None, "")]
    checkpoints = sorted(str(p) for p in root.rglob("*.ckpt"))
    exports = sorted(root.rglob("hf/final"))
    trained = (code == 0 and len(losses) == steps and all(math.isfinite(v) for v in losses)
               and bool(checkpoints) and bool(exports))
    if not stage("fit", trained, started, exit_status=code, losses=losses, checkpoints=checkpoints,
                 exports=[str(p) for p in exports], **({} if trained else {"log_tail": tail})):
        return finish(out, report, ok)

    started = time.perf_counter()
    try:
        import torch
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(exports[0], dtype=torch.float32)
        start = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        names, expected = set(exported.state_dict()), set(start.state_dict())
        moved = sum(not torch.equal(exported.state_dict()[k], start.state_dict()[k]) for k in expected & names)
        loaded = names == expected and moved > 0
        stage("export", loaded, started, tensors=len(names), changed_by_training=moved,
              missing=sorted(expected - names)[:5])
        del exported, start
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        stage("export", False, started, error=repr(e))
        return finish(out, report, ok)

    started = time.perf_counter()
    evaluation = out / "eval"
    code, tail = command(["evaluate", "--config", "conf/eval/math_qwen.yaml", f"--model={exports[0]}",
                          "--engine.kind=hf", f"--engine.dtype={'float32' if args.cpu else 'bfloat16'}",
                          f"--sampling.n={1 if args.cpu else 2}", f"--sampling.max_tokens={8 if args.cpu else 64}",
                          f"--output_dir={evaluation}"], out / "evaluate.log",
                         {**env, "DFT_MATH_EVAL_DATA": str(harness)}, args.timeout)
    summary = evaluation / "summary.json"
    metrics = json.loads(summary.read_text())["metrics"] if summary.exists() else {}
    found = sorted(k for k in metrics if k.endswith(("avg@1", "avg@2")))
    stage("evaluate", code == 0 and len(found) == len(HARNESS_DIRS), started, exit_status=code, metrics=metrics,
          **({} if code == 0 else {"log_tail": tail}))
    return finish(out, report, ok)


def finish(out: Path, report: dict, ok: bool) -> int:
    report["ok"] = ok
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'PASSED' if ok else 'FAILED'}: report in {out / 'gpu_smoke.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
