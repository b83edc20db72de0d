"""``tools/bench.py --quick`` runs every benchmark for real and prints each result with a sane number.

Structure and sanity only: no speed is asserted (timings depend on the machine), but ratios must be
positive and finite, packing must pad less than padding on the length mix, and ``--write`` must
append a dated section naming the machine.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

ROW = re.compile(r"^\| `(?P<key>[a-z_]+)` \| [^|]+ \| (?P<result>[^|]+) \|")
NUMBER = re.compile(r"^<?\s*(?P<value>[0-9]+(?:\.[0-9]+)?)")
KEYS = [
    "dft_sft_step_ratio", "dft_sft_step_ratio_measured", "iwsft_sft_step_ratio", "memory_ratio_sft",
    "memory_ratio_dft", "memory_ratio_entropy", "memory_ratio_eaft", "memory_ratio_asft",
    "padding_efficiency_packed", "padding_efficiency_padded", "padding_efficiency_unsorted", "tokens_per_s_packed",
    "tokens_per_s_padded", "tokens_per_s_unsorted", "packing_speedup", "packing_speedup_grouped",
    "packing_varlen_speedup", "fit_tokens_per_s", "dftsequence_sft_step_ratio", "probpower_sft_step_ratio",
    "chord_sft_step_ratio", "focal_sft_step_ratio", "sadft_sft_step_ratio", "iwsft_precomputed_live_step_ratio",
    "iwsft_precomputed_sft_step_ratio",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--device", "cpu", "--write", str(out_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out_file


def parse(stdout: str) -> dict[str, float]:
    values = {}
    for line in stdout.splitlines():
        row = ROW.match(line)
        if row:
            number = NUMBER.match(row["result"].strip())
            assert number, f"no number in result row: {line}"
            values[row["key"]] = float(number["value"])
    return values


def test_every_result_is_printed_with_a_positive_number(quick_run):
    values = parse(quick_run[0])
    assert set(KEYS) <= set(values), f"missing {sorted(set(KEYS) - set(values))}"
    for key in KEYS:
        assert math.isfinite(values[key]) and values[key] > 0, (key, values[key])
    for key in ("padding_efficiency_packed", "padding_efficiency_padded", "padding_efficiency_unsorted"):
        assert values[key] <= 1.0
    for key in ("memory_ratio_sft", "memory_ratio_dft", "memory_ratio_entropy"):
        assert values[key] < 1.0, f"{key}: the chunked loss path should need less memory than the naive one"


def test_packing_pads_less_than_padding_on_the_length_mix(quick_run):
    values = parse(quick_run[0])
    assert values["padding_efficiency_packed"] > values["padding_efficiency_padded"]
    assert values["padding_efficiency_padded"] >= values["padding_efficiency_unsorted"]


def test_write_appends_a_dated_section_with_the_machine(quick_run):
    text = quick_run[1].read_text()
    assert re.search(r"^## \d{4}-\d{2}-\d{2} .*quick sizes", text, re.M)
    assert "Machine: cpu " in text and "; ram " in text and "; torch " in text
    assert "`dft_sft_step_ratio`" in text and "Settings:" in text
