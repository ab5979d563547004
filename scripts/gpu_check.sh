#!/usr/bin/env bash
# The GPU check pack, on a machine with one CUDA GPU whose python3 holds torch (2.11 or newer),
# torchvision, timm, numpy, PIL, tensorboard and pytest, and no package registry. It installs the
# wheels of `make gpu-wheels` (.whl/: open_clip_torch, webdataset, braceexpand, ftfy, wcwidth)
# into a temporary target with --no-index --no-deps, runs nsoclip from this source tree
# (PYTHONPATH=src), prints the versions (one error line and exit 2 if an import fails), runs the
# GPU-marked tests and the GPU benchmarks, writes full JSON to $OUT (default gpu-check-out/) and
# prints a short table last. At most 8 minutes on one H100/H200, warm-up included.
#
#   bash scripts/gpu_check.sh             # or: make gpu-check
#   bash scripts/gpu_check.sh --dry-run   # or: make gpu-check DRY=1; lists the steps, runs nothing
#   OUT=/somewhere PYTHON=python3 bash scripts/gpu_check.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
[[ $OUT == /* ]] || OUT=$PWD/$OUT
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
cd "$REPO"
shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)

if [[ ${DRY_RUN:-0} == 1 ]]; then
    if ((${#wheels[@]})); then
        printf '  wheels    %7s  %s -m pip install --no-index --no-deps --target TMP %s\n' '~5 s' "$PYTHON" \
            "${wheels[*]#"$REPO"/}"
    else
        printf '  wheels    %7s  none in .whl/ (run make gpu-wheels where PyPI is reachable); imports as installed\n' '-'
    fi
    PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m nsoclip.bench.gpu_check --dry-run \
        --out "$OUT" --python "$PYTHON"
fi

mkdir -p "$OUT"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if ((${#wheels[@]})); then
    echo "wheels: installing ${#wheels[@]} into $site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "${wheels[@]}" || { echo "error: pip could not install .whl/*.whl into $site" >&2; exit 2; }
fi
export PYTHONPATH="$REPO/src:$site${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m nsoclip.bench.gpu_check --out "$OUT" --python "$PYTHON"
