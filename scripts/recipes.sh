# shellcheck shell=bash
# Sourced by the launch scripts: the reference CLIP recipes (NSO paper, CC3M), checks of the
# environment variables they read, and the dry-run printer. Not meant to be run on its own.

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

require_env() {  # VARIABLE, what to export
    [[ -n ${!1:-} ]] || die "$1 is not set: export $1=$2"
}

require_count() {  # VARIABLE that must hold a positive integer
    [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "$1=${!1}: must be a positive integer"
}

# One line that can be pasted back into a shell: words with shell-special characters single-quoted.
print_command() {
    local word line="" plain='^[A-Za-z0-9_./=:,@+%-]+$'
    for word in "$@"; do
        [[ $word =~ $plain ]] || word=${word@Q}
        line+="$word "
    done
    printf '%s\n' "${line% }"
}

# Dry runs print the command and stop; real runs replace this shell with it.
launch() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        print_command "$@"
        exit 0
    fi
    exec "$@"
}

# First host of a SLURM node list. scontrol expands it on the cluster; off the cluster (dry runs)
# the first entry of lists like `gpu[03-05,07],cpu1` is expanded by hand.
first_host() {
    if command -v scontrol >/dev/null 2>&1; then
        local hosts
        hosts=$(scontrol show hostnames "$1")
        printf '%s\n' "${hosts%%$'\n'*}"
        return
    fi
    local first=${1%%,*}
    if [[ $1 == *\[* && ${1%%\[*} != *,* ]]; then
        local range=${1#*\[}
        first=${1%%\[*}${range%%[],-]*}
    fi
    printf '%s\n' "$first"
}

# The run folder holding CHECKPOINT ({logs}/{name}/checkpoints/x.pt -> {logs}/{name}).
run_dir_of() {
    if [[ $1 == */checkpoints/* ]]; then
        printf '%s\n' "${1%/checkpoints/*}"
    else
        dirname "$1"
    fi
}

# Sets TRAIN_FLAGS (the nsoclip.main flags of RECIPE) and RUN_NAME. The name is fixed by the recipe,
# not by the date, so a requeued or re-submitted job finds its run folder and resumes it.
train_flags() {
    require_env TRAIN_DATA "'/data/cc3m/{00000..00331}.tar' (webdataset shards)"
    require_env TRAIN_NUM_SAMPLES "<samples per epoch> (e.g. 2905954 for a full CC3M download)"
    require_env LOGS "<folder for run folders, on storage every node sees>"
    require_count TRAIN_NUM_SAMPLES

    local recipe=${RECIPE:-adamw} model=${MODEL:-ViT-S-16} precision=${PRECISION:-amp} batch=${BATCH_SIZE:-128}
    local sigma=${NSO_SIGMA:-0.01} rho=${SAM_RHO:-0.05} epochs=30 tag
    [[ $batch =~ ^[1-9][0-9]*$ ]] || die "BATCH_SIZE=$batch: must be a positive integer"
    local nso=(--opt nso --nso-sigma "$sigma" --nso-num-perturbs 1 --nso-two-point --nso-lam 0)
    local optimizer
    case $recipe in
        adamw) optimizer=(--opt adamw) tag="" ;;
        nso) optimizer=("${nso[@]}") tag="-sigma$sigma" ;;
        # Compute-matched to 30 epochs of k=1 two-point NSO (two forward/backward passes per step):
        # NSO with half the epochs matches the AdamW baseline; AdamW with twice the batch (the
        # same steps as NSO, each pass over twice the samples: more negatives) or twice the steps
        # matches NSO.
        nso-compute-matched) optimizer=("${nso[@]}") tag="-sigma$sigma" epochs=15 ;;
        adamw-2x-batch) optimizer=(--opt adamw) tag="" epochs=60 batch=$((2 * batch)) ;;
        adamw-2x-steps) optimizer=(--opt adamw) tag="" epochs=60 ;;
        sam) optimizer=(--opt sam --sam-rho "$rho") tag="-rho$rho" ;;
        # A model too large for DDP's whole copy per GPU: parameters, gradients, AdamW state and
        # NSO's snapshot sharded over all ranks (FSDP2), bf16 compute, sharded step checkpoints.
        nso-fsdp)
            optimizer=("${nso[@]}" --fsdp --fsdp-checkpoint sharded --grad-checkpointing) tag="-sigma$sigma"
            model=${MODEL:-ViT-H-14} precision=${PRECISION:-amp_bf16} ;;
        *) die "RECIPE=$recipe: choose adamw, nso, nso-compute-matched, adamw-2x-batch, adamw-2x-steps, sam or nso-fsdp" ;;
    esac
    local model_tag=${model##*/}
    RUN_NAME=${NAME:-$recipe-${model_tag%.json}$tag${NAME_SUFFIX:-}}

    TRAIN_FLAGS=(
        --train-data "$TRAIN_DATA" --train-num-samples "$TRAIN_NUM_SAMPLES" --dataset-type webdataset
        --model "$model" --batch-size "$batch" --workers "${WORKERS:-8}"
        --precision "$precision" --local-loss --gather-with-grad
        --lr 1e-3 --wd 0.1 --warmup 10000 --epochs "$epochs" "${optimizer[@]}"
        --seed "${SEED:-0}" --logs "$LOGS" --name "$RUN_NAME" --resume latest
        --report-to tensorboard --save-frequency 1 --save-most-recent
        --save-every-n-steps "${SAVE_EVERY_N_STEPS:-1000}"
    )
    if [[ -n ${VAL_DATA:-} ]]; then
        require_env VAL_NUM_SAMPLES "<samples in VAL_DATA>"
        TRAIN_FLAGS+=(--val-data "$VAL_DATA" --val-num-samples "$VAL_NUM_SAMPLES")
    fi
    if [[ -n ${IMAGENET_VAL:-} ]]; then
        TRAIN_FLAGS+=(--imagenet-val "$IMAGENET_VAL")
    fi
}

# The SLURM scripts run inside a job; a dry run off the cluster pretends to be job 0 on this host.
require_slurm_job() {
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        [[ ${DRY_RUN:-0} == 1 ]] || die "not inside a SLURM job: submit with sbatch (DRY_RUN=1 prints the command)"
        SLURM_JOB_ID=0
        SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-${HOSTNAME:-localhost}}
    fi
}
