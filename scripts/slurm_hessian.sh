#!/usr/bin/env bash
# Flatness of a trained checkpoint with SLURM: Hessian trace (with standard error), per-block and
# per-tower traces, top eigenvalues and noise stability of the global contrastive training loss.
# The JSON lands in the checkpoint's run folder, where `python -m nsoclip.report` finds it.
#
#   CHECKPOINT=/shared/logs/nso-ViT-S-16-sigma0.01/checkpoints/epoch_30.pt \
#   TRAIN_DATA='/data/cc3m/{00000..00331}.tar' TRAIN_NUM_SAMPLES=2905954 sbatch scripts/slurm_hessian.sh
#   DRY_RUN=1 CHECKPOINT=... bash scripts/slurm_hessian.sh     # print the srun command, run nothing
#SBATCH --job-name=nsoclip-hessian
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# sbatch runs a copy of this file from its spool folder: find recipes.sh from the submit folder then.
[[ -f $scripts_dir/recipes.sh ]] || scripts_dir=${NSOCLIP_SCRIPTS:-${SLURM_SUBMIT_DIR:-.}/scripts}
if [[ ! -f $scripts_dir/recipes.sh ]]; then
    echo "error: $scripts_dir/recipes.sh not found: submit from the repository root or export NSOCLIP_SCRIPTS=<repo>/scripts" >&2
    exit 2
fi
# shellcheck source-path=SCRIPTDIR source=recipes.sh
source "$scripts_dir/recipes.sh"

require_slurm_job
require_env CHECKPOINT "<run folder>/checkpoints/epoch_30.pt (the checkpoint to measure)"
require_env TRAIN_DATA "'/data/cc3m/{00000..00331}.tar' (the loss is measured on training batches)"
require_env TRAIN_NUM_SAMPLES "<samples in TRAIN_DATA>"
require_count TRAIN_NUM_SAMPLES
output=${HESSIAN_OUTPUT:-$(run_dir_of "$CHECKPOINT")/hessian-$(basename "$CHECKPOINT" .pt).json}

flags=(
    --model "${MODEL:-ViT-S-16}" --resume "$CHECKPOINT"
    --train-data "$TRAIN_DATA" --train-num-samples "$TRAIN_NUM_SAMPLES" --dataset-type webdataset
    --batch-size "${BATCH_SIZE:-128}" --workers "${WORKERS:-8}" --precision "${PRECISION:-fp32}"
    --local-loss --gather-with-grad --seed "${SEED:-0}"
    --hessian-num-batches "${HESSIAN_NUM_BATCHES:-4}" --hessian-probes "${HESSIAN_PROBES:-64}"
    --hessian-method "${HESSIAN_METHOD:-hutchinson}" --hessian-hvp "${HESSIAN_HVP:-exact}"
    --hessian-top-k "${HESSIAN_TOP_K:-1}" --hessian-output "$output"
)
noise_sigmas=${NOISE_SIGMAS-0.008,0.01,0.015}
if [[ -n $noise_sigmas ]]; then
    flags+=(--noise-stability-sigmas "$noise_sigmas")
fi

MASTER_ADDR=$(first_host "$SLURM_JOB_NODELIST")
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

command=(srun --cpu_bind=v --accel-bind=gn --kill-on-bad-exit=1
         "${PYTHON:-python}" -u -m nsoclip.hessian "${flags[@]}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    print_command "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "${command[@]}"
    exit 0
fi
exec "${command[@]}"
