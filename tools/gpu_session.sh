#!/usr/bin/env bash
# Everything issue #5 asks of a GPU machine, in one run (about 6-8 minutes on one H100):
#   bash tools/gpu_session.sh [OUT_DIR]      # default OUT_DIR: $OUT, else gpu-results
# 1. tools/gpu_check.py: Qwen2.5-1.5B shapes, FSDP2, bf16, activation checkpointing, sequence 2,048:
#    tokens/s/GPU, MFU, DFT / SFT step time (gpu_check.json, gpu_check.log);
# 2. tools/bench.py on CUDA: DFT / SFT, loss-path memory (torch.cuda.max_memory_allocated) and packing
#    with sdpa (BENCHMARKS.gpu.md, bench.log); then packing with flash_attention_2 when flash-attn imports.
# 3. tools/gpu_smoke.py: a Table 1 config end to end on the Qwen2.5-Math-1.5B shapes with random weights (fit with
#    FSDP2 and a sharded checkpoint, HF export, evaluation with the HF engine; smoke/gpu_smoke.json, gpu_smoke.log).
# Each part runs even if an earlier one failed; the exit status is that of the first failure.
# Runs from a checkout without installing it (PYTHONPATH), on the machine's own torch/transformers.
# QUICK=1: tiny sizes on the CPU, to check the script itself anywhere in a minute or two.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, remember the first failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && echo "== $name failed with status $rc" && [ "$status" -eq 0 ] && status=$rc
    return 0
}
if [ "${QUICK:-0}" = 1 ]; then check=(--tiny --steps 1 --warmup 1); bench=(--quick --device cpu); device=cpu
    smoke=(--cpu)
else check=(); bench=(--device cuda); device=cuda; smoke=(); fi
run env python -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, \
lightning.__version__, torch.cuda.get_device_name() if '$device' == 'cuda' else 'cpu')"
run gpu_check python tools/gpu_check.py "${check[@]}" --json "$out/gpu_check.json"
run bench python tools/bench.py "${bench[@]}" --only dft,memory,packing --write "$out/BENCHMARKS.gpu.md"
run gpu_smoke python tools/gpu_smoke.py "${smoke[@]}" --out "$out/smoke"
if python -c "import flash_attn" 2>/dev/null; then
    run bench_flash python tools/bench.py "${bench[@]}" --only packing --pack-attn flash_attention_2 \
        --write "$out/BENCHMARKS.gpu.md"
fi
exit "$status"
