"""Benchmark suite: objective overhead, loss-path memory, packing, end-to-end fit throughput.

Everything is measured side by side in one run on the machine at hand:

1. ``dft``: DFT / SFT step time on the same model and micro-batch, through the module's own path
   (``FineTuneModule.token_stats`` + objective + ``backward``), repetitions interleaved, median ratio.
2. ``iwsft``: iw-SFT / SFT step time, the frozen reference model's forward included; and iw-SFT with
   precomputed reference log-probs (``model.reference: precomputed:<file>``, no reference forward)
   against the live-reference step and against SFT.
3. ``memory``: peak memory of the loss path alone (hidden states ``[tokens, hidden]`` and output
   weight ``[vocab, hidden]`` -> per-token statistics -> objective -> backward), chunked
   (``dft_lightning.tokens.token_statistics``) over naive (full logits, ``log_softmax`` and
   ``gather`` in one go), for SFT, DFT and an entropy-regularised SFT (the ``requires={"entropy"}``
   path). Each measurement runs in a fresh subprocess; on CPU the peak is the growth of the peak
   resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs exist) over the
   resident set at that point, on CUDA ``torch.cuda.max_memory_allocated``.
4. ``packing``: tokens/s and padding efficiency of the real collators (``StepCollator``, length
   grouped padding, and ``PackedStepCollator``) on records whose lengths are drawn log-uniformly
   over an 8x range, with a small random Qwen2 (real forward + backward) and the same token budget
   per micro-batch (``micro_batch_size`` rows of at most ``pack_length`` tokens); padding in plain
   arrival order (no length grouping) is shown as a third, naive reference.
5. ``fit``: end-to-end ``python -m dft_lightning fit`` on the demo config (evaluation callback,
   W&B, checkpointing and export switched off), supervised tokens/s read from the CSV metrics.

Usage::

    python tools/bench.py                 # full sizes (several minutes on 2 CPU cores)
    python tools/bench.py --quick         # reduced sizes, seconds each (what the tests run)
    python tools/bench.py --only dft,memory --write BENCHMARKS.md

``--write`` appends a dated section (machine, torch version, settings, result table) to a
Markdown file. Results are printed as a table with one stable key per row.

Not handled here: multi-GPU runs, optimizer-step time in the objective comparisons (identical
across objectives), interpretation of the numbers (the goals are printed beside them, nothing more).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_suite, beside this script

from bench_suite.common import BENCHMARKS, DEMO_MODEL, GIB, Section  # noqa: E402
from bench_suite.memory import bench_memory, memory_child  # noqa: E402
from bench_suite.packing import bench_packing  # noqa: E402
from bench_suite.steps import bench_fit, bench_objectives  # noqa: E402


# -- reporting -------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """CPU model, cores, RAM, accelerator and library versions of this machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)",
        "ram": f"{ram:.1f} GiB",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "load average at start": "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "no", None: ""}[met]


def table(sections: list[Section]) -> list[str]:
    lines = ["| key | measurement | result | goal | met |", "| --- | --- | --- | --- | --- |"]
    for s in sections:
        for r in s.results:
            lines.append(f"| `{r.key}` | {r.label} | {r.shown} | {r.goal} | {_fmt_met(r.met)} |")
    return lines


def markdown_section(sections: list[Section], info: dict[str, str], args: argparse.Namespace, wall: float) -> str:
    stamp = datetime.datetime.now().astimezone()
    mode = "quick sizes" if args.quick else "full sizes"
    lines = [
        f"## {stamp:%Y-%m-%d %H:%M %Z}: {mode}", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        f"Command: `python tools/bench.py {' '.join(args.argv)}`".rstrip() + f" ({wall:.0f} s).", "",
        *table(sections), "", "Settings:", "",
        *[f"- {s}" for sec in sections for s in sec.settings], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, a few seconds per benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--write", metavar="MARKDOWN", help="append a dated section to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--step-model", help=f"model for the step-time ratios (default: {DEMO_MODEL})")
    parser.add_argument("--reps", type=int, default=12, help="measured repetitions per objective")
    parser.add_argument("--mem-tokens", type=int, default=16384)
    parser.add_argument("--mem-vocab", type=int, default=129280, help="129,280 is DeepSeek-V3's vocabulary")
    parser.add_argument("--mem-hidden", type=int, default=64)
    parser.add_argument("--mem-chunk", type=int, default=None,
                        help="token_statistics chunk_size (default: the module's, sized from the vocabulary)")
    parser.add_argument("--mem-extra-chunks", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                        help="further chunk sizes measured for SFT against the same naive measurement")
    parser.add_argument("--mem-dtype", default="bfloat16", help="dtype of hidden states and weight in the loss path")
    parser.add_argument("--pack-steps", type=int, default=2, help="optimizer steps of records in the packing benchmark")
    parser.add_argument("--pack-reps", type=int, default=2, help="timed repetitions of each packing micro-batch")
    parser.add_argument("--pack-attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"],
                        help="attention backend of the packing model (flash_attention_2: GPU with flash-attn)")
    parser.add_argument("--fit-steps", type=int, default=5)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    which = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = which - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    started = time.perf_counter()
    sections: list[Section] = []
    plan: list[tuple[str, Callable[[], Section]]] = []
    if which & {"dft", "iwsft"}:
        plan.append(("dft/iwsft step time", lambda: bench_objectives(args, which, device)))
    if "memory" in which:
        plan.append(("loss-path memory", lambda: bench_memory(args, device)))
    if "packing" in which:
        plan.append(("packing vs padding", lambda: bench_packing(args, device)))
    if "fit" in which:
        plan.append(("end-to-end fit", lambda: bench_fit(args, device)))
    for title, run in plan:
        print(f"\n== {title}", flush=True)
        t0 = time.perf_counter()
        sections.append(run())
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    info["load average at end"] = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())

    print("\n" + "\n".join(table(sections)))
    print("\nSettings:\n" + "\n".join(f"- {s}" for sec in sections for s in sec.settings))
    if args.write:
        path = Path(args.write)
        text = markdown_section(sections, info, args, wall)
        existing = path.read_text() if path.exists() else "# Benchmarks\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text)
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
