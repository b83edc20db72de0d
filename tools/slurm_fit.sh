#!/usr/bin/env bash
# Fine-tune on a SLURM cluster: N nodes x 8 GPUs, FSDP2 sharding across all ranks.
#   sbatch --nodes=4 tools/slurm_fit.sh --config conf/paper/base_math.yaml --config conf/paper/table1_qwen25_math_7b.yaml
#   DRY_RUN=1 bash tools/slurm_fit.sh --config conf/paper/base_math.yaml     # print the launch line, run nothing
# Arguments are those of `python -m dft_lightning fit`. The script adds the FSDP2 overlay
# (conf/overlays/fsdp2.yaml, bf16 compute over fp32 master weights), trainer.num_nodes and trainer.devices.
# data.batch_size stays the global batch: with N x 8 ranks each rank gets batch_size / (8 N) rows per step.
#
# LAUNCH=srun (default): one SLURM task per GPU; Lightning's SLURM environment reads the ranks from SLURM
#   and handles the requeue signal (#SBATCH --signal below): a checkpoint is saved, the job requeued, and the
#   requeued job resumes from it by itself.
# LAUNCH=torchrun: one task per node running torchrun with a c10d rendezvous on the first node (the
#   launch clusters without SLURM use too); SLURM's task variables are hidden from Lightning.
# Environment: GPUS_PER_NODE (8), PYTHON (python), OVERLAY (conf/overlays/fsdp2.yaml; empty: none),
#   PARAM_DTYPE (bfloat16), RDZV_PORT (29500), NODES (outside a job: the node count of a dry run).
# Checkpoints are sharded (one file per rank in a directory; resume with --ckpt_path=<that directory>, on
# any number of ranks), and the HF export at the end is gathered on rank zero.
#SBATCH --job-name=dft-fit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

repo="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$repo"
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${NODES:-1}}}"
gpus="${GPUS_PER_NODE:-8}"
python="${PYTHON:-python}"
overlay="${OVERLAY-conf/overlays/fsdp2.yaml}"
launch="${LAUNCH:-srun}"

# the overlay first (it sets only the strategy), so the user's configs and overrides win over it
fit=(-m dft_lightning fit)
if [ -n "$overlay" ]; then
    fit+=(--config "$overlay" "--model.fsdp_param_dtype=${PARAM_DTYPE:-bfloat16}")
fi
fit+=("$@" "--trainer.num_nodes=$nodes" "--trainer.devices=$gpus" --trainer.accelerator=gpu)

case "$launch" in
    srun)
        cmd=(srun --kill-on-bad-exit=1 "--ntasks-per-node=$gpus" "$python" "${fit[@]}")
        ;;
    torchrun)
        if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol > /dev/null; then
            head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        else
            head_node="${MASTER_ADDR:-$(hostname)}"
        fi
        cmd=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 "--ntasks=$nodes"
             env -u SLURM_NTASKS -u SLURM_NPROCS
             "$python" -m torch.distributed.run "--nnodes=$nodes" "--nproc-per-node=$gpus"
             --rdzv-backend=c10d "--rdzv-endpoint=$head_node:${RDZV_PORT:-29500}" "--rdzv-id=${SLURM_JOB_ID:-dft}"
             "${fit[@]}")
        ;;
    *)
        echo "error: LAUNCH must be srun or torchrun, got '$launch'" >&2
        exit 2
        ;;
esac

export TOKENIZERS_PARALLELISM=false
printf '%q ' "${cmd[@]}"
printf '\n'
if [ "${DRY_RUN:-0}" = 1 ]; then
    exit 0
fi
exec "${cmd[@]}"
