#!/usr/bin/env bash
# A grid of training runs (RECIPES x NSO_SIGMAS x SEEDS) as one SLURM job array: task i trains
# grid entry i exactly as scripts/slurm_train.sh does (same resources, requeue and resume), in
# its own run folder named by the recipe with -seed<SEED>, so that `python -m nsoclip.report`
# groups the seeds of each setting. The sigma axis applies to the NSO recipes only.
#
#   RECIPES='adamw nso' NSO_SIGMAS='0.008 0.01 0.015' SEEDS='0 1 2' TRAIN_DATA='/data/cc3m/{00000..00331}.tar' \
#   TRAIN_NUM_SAMPLES=2905954 LOGS=/shared/logs bash scripts/slurm_sweep.sh [extra nsoclip.main flags]
#       # submits the array (sbatch --array=0-N-1; MAX_PARALLEL caps the tasks running at once;
#       # SBATCH_ARGS='--nodes=4 --partition=gpu' adds sbatch options, which override the header's)
#   bash scripts/slurm_sweep.sh --dry-run     # (or DRY_RUN=1) print the sbatch command, then every task's command
#   SLURM_ARRAY_TASK_ID=3 bash scripts/slurm_sweep.sh --dry-run     # print task 3's command only
#SBATCH --job-name=nsoclip-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
export DRY_RUN=${DRY_RUN:-0}
scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# sbatch runs a copy of this file from its spool folder: find recipes.sh from the submit folder then.
[[ -f $scripts_dir/recipes.sh ]] || scripts_dir=${NSOCLIP_SCRIPTS:-${SLURM_SUBMIT_DIR:-.}/scripts}
if [[ ! -f $scripts_dir/recipes.sh ]]; then
    echo "error: $scripts_dir/recipes.sh not found: submit from the repository root or export NSOCLIP_SCRIPTS=<repo>/scripts" >&2
    exit 2
fi
# shellcheck source-path=SCRIPTDIR source=recipes.sh
source "$scripts_dir/recipes.sh"

# GRID: one "recipe sigma seed" entry per array task, recipes outermost, seeds innermost.
read -ra recipes <<< "${RECIPES:-adamw nso}"
read -ra sigmas <<< "${NSO_SIGMAS:-${NSO_SIGMA:-0.01}}"
read -ra seeds <<< "${SEEDS:-0 1 2}"
(( ${#recipes[@]} && ${#sigmas[@]} && ${#seeds[@]} )) || die "RECIPES, NSO_SIGMAS and SEEDS must each hold at least one value"
GRID=()
for recipe in "${recipes[@]}"; do
    case $recipe in
        nso | nso-compute-matched) recipe_sigmas=("${sigmas[@]}") ;;
        *) recipe_sigmas=(-) ;;
    esac
    for sigma in "${recipe_sigmas[@]}"; do
        for seed in "${seeds[@]}"; do
            [[ $seed =~ ^[0-9]+$ ]] || die "SEEDS: $seed is not a non-negative integer"
            GRID+=("$recipe $sigma $seed")
        done
    done
done

# Exports the settings of grid entry $1 for scripts/slurm_train.sh.
select_task() {
    if [[ ! $1 =~ ^[0-9]+$ ]] || (($1 >= ${#GRID[@]})); then
        die "SLURM_ARRAY_TASK_ID=$1: the grid has tasks 0..$((${#GRID[@]} - 1))"
    fi
    local sigma
    read -r RECIPE sigma SEED <<< "${GRID[$1]}"
    [[ $sigma == - ]] || NSO_SIGMA=$sigma
    NAME_SUFFIX=-seed$SEED
    export RECIPE SEED NAME_SUFFIX
    [[ -z ${NSO_SIGMA:-} ]] || export NSO_SIGMA
}

if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    select_task "$SLURM_ARRAY_TASK_ID"
    exec "$BASH" "$scripts_dir/slurm_train.sh" "$@"
fi

# Submission: every task's settings are checked (in a subshell each) before anything is queued.
for task in "${!GRID[@]}"; do
    (select_task "$task"; train_flags)
done
max_parallel=${MAX_PARALLEL:-}
[[ -z $max_parallel || $max_parallel =~ ^[1-9][0-9]*$ ]] || die "MAX_PARALLEL=$max_parallel: must be a positive integer"
read -ra sbatch_args <<< "${SBATCH_ARGS:-}"
submit=(sbatch "--array=0-$((${#GRID[@]} - 1))${max_parallel:+%$max_parallel}" "${sbatch_args[@]}"
        "$scripts_dir/slurm_sweep.sh" "$@")
if [[ $DRY_RUN == 1 ]]; then
    print_command "${submit[@]}"
    for task in "${!GRID[@]}"; do
        SLURM_ARRAY_TASK_ID=$task "$BASH" "$scripts_dir/slurm_sweep.sh" "$@"
    done
    exit 0
fi
exec "${submit[@]}"
