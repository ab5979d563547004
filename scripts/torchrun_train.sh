#!/usr/bin/env bash
# CLIP pretraining under torchrun, on one node or, with NNODES > 1, on several nodes meeting at a
# c10d rendezvous: run the same command on every node. With MAX_RESTARTS > 0, torchrun restarts
# failed workers and they resume from the newest checkpoint (the run name is fixed by the recipe).
#
#   RECIPE=nso TRAIN_DATA='/data/cc3m/{00000..00331}.tar' TRAIN_NUM_SAMPLES=2905954 LOGS=./logs \
#   bash scripts/torchrun_train.sh [extra nsoclip.main flags]
#   NNODES=2 RDZV_ENDPOINT=node0:29400 ... bash scripts/torchrun_train.sh     # on each node
#   RECIPE=nso-fsdp MAX_RESTARTS=3 ... bash scripts/torchrun_train.sh   # ViT-H-14 NSO sharded over the GPUs (FSDP2)
#   bash scripts/torchrun_train.sh --dry-run     # (or DRY_RUN=1) print the command, run nothing
set -euo pipefail

if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=recipes.sh
source "$scripts_dir/recipes.sh"
train_flags

nnodes=${NNODES:-1}
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "NNODES=$nnodes: must be a positive integer"
# torchrun through $PYTHON (python -m torch.distributed.run is torchrun).
launcher=("${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="${NPROC_PER_NODE:-gpu}"
          --max-restarts="${MAX_RESTARTS:-0}")
if [[ $nnodes == 1 ]]; then
    launcher+=(--standalone)
else
    require_env RDZV_ENDPOINT "<host:port of a node every node can reach, the same on all nodes>"
    launcher+=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
               --rdzv-id="${RDZV_ID:-$RUN_NAME}")
fi
# The `--` after the module keeps our flags away from torchrun's parser: without it torchrun
# rejects --logs as an ambiguous --logs-specs.
launch "${launcher[@]}" -m nsoclip.main -- "${TRAIN_FLAGS[@]}" "$@"
