#!/usr/bin/env bash
# The GPU check (bench/gpu.py) on a GPU machine without network, from the bundle `make gpu-bundle` gathers.
# Its Python must have torch, torchvision, lightning, torchmetrics, rich and pytest; the bundle's wheels
# (jsonargparse and its signature extras) are installed into a temporary folder, not into that Python.
# Run from anywhere: bench/gpu-offline.sh OUT_DIR [flags of bench/gpu.py]. OUT_DIR receives results.json,
# results.txt and the log, also when a step fails or the run is stopped.
set -uo pipefail
out=${1:?usage: bench/gpu-offline.sh OUT_DIR [flags of bench/gpu.py]}
shift
# Made and resolved before moving to the repository: a relative OUT_DIR is the caller's, not the repository's.
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# A missing bundle in one line: pip's and tar's own messages on it took two and three lines, before the remedy.
compgen -G "bundle/wheels/*.whl" > /dev/null \
    || { echo "gpu-offline: could not install bundle/wheels: no wheels there (run make gpu-bundle first)" >&2; exit 2; }
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT  # the wheels installed for this run only: each run left its folder in /tmp
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" bundle/wheels/*.whl \
    || { echo "gpu-offline: could not install bundle/wheels (run make gpu-bundle first)" >&2; exit 2; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ ! -f data/cifar10-jpg/.unpacked ]; then
    [ -f bundle/cifar10-train-jpg.tar.gz ] \
        || { echo "gpu-offline: no bundle/cifar10-train-jpg.tar.gz to unpack (run make gpu-bundle first)" >&2; exit 2; }
    sh bench/jpg-archive.sh gpu-offline bundle/cifar10-train-jpg.tar.gz data/cifar10-jpg >&2 || exit 2
fi
# The layout checked before any step, as `make data` checks it: a folder of another layout (marked unpacked by an
# earlier script, which did not check) failed in the first step, after the GPU machine's start-up.
error=$(sh bench/jpg-archive.sh gpu-offline data/cifar10-jpg) \
    || { echo "$error (remove data/cifar10-jpg to unpack bundle/cifar10-train-jpg.tar.gz again)" >&2; exit 2; }
# results.json goes straight to OUT_DIR and is rewritten after every step: a call killed at the device's time
# limit still returns the steps it finished.
"$python" -m bench.gpu --out runs/bench-gpu --results "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
