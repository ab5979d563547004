#!/usr/bin/env bash
# CLIP pretraining on N nodes x G GPUs with SLURM; one rank per GPU. A requeued job (preemption, or
# the time limit: USR1 two minutes before it) resumes its run folder from the newest checkpoint.
#
#   RECIPE=nso NSO_SIGMA=0.01 TRAIN_DATA='/data/cc3m/{00000..00331}.tar' TRAIN_NUM_SAMPLES=2905954 \
#   LOGS=/shared/logs sbatch --nodes=4 scripts/slurm_train.sh [extra nsoclip.main flags]
#   RECIPE=nso-fsdp ... sbatch --nodes=8 scripts/slurm_train.sh   # ViT-H-14 NSO sharded over all GPUs (FSDP2)
#   DRY_RUN=1 RECIPE=... bash scripts/slurm_train.sh     # print the srun command, run nothing
#
# Keep --ntasks-per-node equal to --gpus-per-node when overriding them on the sbatch command line.
#SBATCH --job-name=nsoclip-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
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
train_flags

# Derived from the allocation, never inherited from the submitting shell (sbatch exports it all).
MASTER_ADDR=$(first_host "$SLURM_JOB_NODELIST")
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

command=(srun --cpu_bind=v --accel-bind=gn --kill-on-bad-exit=1
         "${PYTHON:-python}" -u -m nsoclip.main "${TRAIN_FLAGS[@]}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    print_command "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "${command[@]}"
    exit 0
fi

# Near the time limit: requeue; the next start resumes from the newest step checkpoint.
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID" >&2; scontrol requeue "$SLURM_JOB_ID"' USR1
"${command[@]}" &
wait $!
