#!/usr/bin/env bash
# Zero-shot ImageNet top-1/top-5 of a checkpoint (ours or OpenCLIP's), as a plain process or, with
# NPROC_PER_NODE > 1 (or `gpu`), under torchrun with the images split across ranks. The JSON lands
# in the checkpoint's run folder unless OUTPUT says otherwise.
#
#   CHECKPOINT=logs/nso-ViT-S-16-sigma0.01/checkpoints/epoch_30.pt IMAGENET_VAL=/data/imagenet/val \
#   NPROC_PER_NODE=8 bash scripts/zeroshot_imagenet.sh [extra nsoclip.zeroshot flags]
#   bash scripts/zeroshot_imagenet.sh --dry-run     # (or DRY_RUN=1) print the command, run nothing
set -euo pipefail

if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=recipes.sh
source "$scripts_dir/recipes.sh"

require_env CHECKPOINT "<run folder>/checkpoints/epoch_30.pt (ours or an OpenCLIP checkpoint)"
require_env IMAGENET_VAL "<ImageNet validation folder, one subfolder per WordNet id>"
output=${OUTPUT:-$(run_dir_of "$CHECKPOINT")/zeroshot-imagenet-$(basename "$CHECKPOINT" .pt).json}

flags=(
    --model "${MODEL:-ViT-S-16}" --pretrained "$CHECKPOINT" --imagenet-val "$IMAGENET_VAL"
    --batch-size "${BATCH_SIZE:-256}" --workers "${WORKERS:-8}" --precision "${PRECISION:-amp}"
    --output "$output"
)
nproc=${NPROC_PER_NODE:-1}
if [[ $nproc == 1 ]]; then
    launch "${PYTHON:-python}" -m nsoclip.zeroshot "${flags[@]}" "$@"
fi
# torchrun through $PYTHON (python -m torch.distributed.run is torchrun); the `--` after the module
# keeps our flags away from torchrun's own parser.
launch "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    -m nsoclip.zeroshot -- "${flags[@]}" "$@"
