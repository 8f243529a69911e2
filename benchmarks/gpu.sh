#!/usr/bin/env bash
# The GPU half of issue #18 as one prepared run (docs/performance.md, "The GPU path").
#
#   benchmarks/gpu.sh --fetch   here (PYTHON=.venv/bin/python), with pip and the registries: builds
#                               this project's wheel and downloads the wheels the device image
#                               lacks (Python 3.12, manylinux x86-64) into .whl/
#   benchmarks/gpu.sh           on the device machine, with .whl carried: installs them next to
#                               the image's packages (torch, peft, transformers, scipy and
#                               threadpoolctl come from the image), checks that every
#                               method gives the CPU's result on the GPU, then runs the 7B-layer
#                               benchmark with --device cuda. Everything lands in $OUT.
#
# With the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."

# Not in the device image (KINDS.md's package list), at the versions constraints.txt pins.
MISSING=()
for name in mergekit pydantic pydantic_core annotated-types typing-inspection immutables datasets dill multiprocess; do
    MISSING+=("$(grep -i "^${name}==" constraints.txt)")
done

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    "${PYTHON:-python3}" -m pip wheel -q --no-deps -w .whl .
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${MISSING[@]}"
    ls -l .whl
    exit 0
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
# into the image's own environment (the machine starts bare each time): there the .pth hook
# runs and mergekit-yaml lands next to the python that bench.py starts it from
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
PY=python3
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, mergekit_seed, mergekit; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

# Same results on the GPU as on the CPU, for every method (tests/test_devices.py's GPU tests).
$PY -m pytest -q -p no:warnings tests/test_devices.py 2>&1 | tee "$OUT/tests.txt" || echo "GPU tests failed: see tests.txt"

# The 7B-layer table on the GPU; the adapter routes and the floors are CPU questions.
timeout 420 $PY benchmarks/bench.py --device cuda --size 7b-layer --dtype bfloat16 --reps 1 \
    --skip-adapters --timeout 120 --out "$OUT/RESULTS-cuda.md" 2>&1 | tee "$OUT/bench.log"

# select over Ray with GPU tasks (two on the one GPU: --gpus-per-task 0.5) against the sequential
# sweep, on the 45.7M model. The image has no Ray, and Ray's wheel (about 70 MiB) exceeds what a
# run may carry, so this step runs only on a machine where Ray is installed.
if $PY -c "import ray" 2>/dev/null; then
    timeout 300 $PY benchmarks/select_scale.py --device cuda --gpus-per-task 0.5 \
        --out "$OUT/select-scale-cuda.json" 2>&1 | tail -30 | tee "$OUT/select-scale.log"
else
    echo "select over Ray on the GPU: skipped, Ray is not installed here" | tee "$OUT/select-scale.log"
fi
