#!/usr/bin/env bash
# Rehearse bench/device_check.sh without a GPU, on the emulated GPU (tests/emulated_gpu), before a GPU session
# spends its 15 minutes on it:
#
#     bash bench/rehearse_device_check.sh [OUT_DIR]              # default /tmp/device_check_rehearsal
#     bash bench/rehearse_device_check.sh --shrink < bench/device_check.sh     # print the shrunk script only
#
# Runs the working tree's device check (uncommitted changes included) in a copy whose script is shrunk to what
# the emulated GPU can run in minutes: ResNet-8 instead of 44, batches 16 and 32 instead of 128 and 512, 1-2
# timed steps, every stage limit 12x longer (the emulator is slow, and the stages pace themselves to their
# limits), the accuracy runs 0.05 epoch of ResNet-8 (the default DEVICE_CHECK_ACCURACY_ARGS below: two entries,
# so the further-runs stage runs too), the 300-step training run 5 steps (evaluating every 2). Stages that need
# PyTorch with CUDA skip themselves, as on a machine without it. What it checks: every stage's commands run, their JSON reaches
# best_step_options.py and the summary, and the options chosen are passed on; not a figure it prints.
# Takes about 8 minutes on the project's 2-core machine. The environment passes through (DEVICE_CHECK_SKIP,
# default "install,gpu_tests": the emulated suite is `pytest -m gpu` itself; DEVICE_CHECK_ACCURACY,
# default 1; DEVICE_CHECK_OPTIONS_FROM). The CIFAR-10 converter needs Pillow: without it the data stages
# fail or skip (their commands are then not rehearsed).
set -euo pipefail

shrink() {   # device_check.sh on stdin -> its rehearsal version on stdout
    sed -e 's/--depths 44/--depths 8/g; s/--depth 44/--depth 8/g' \
        -e 's/--batches 128/--batches 16/g; s/--batch 128/--batch 16/g; s/--batches 512/--batches 32/g' \
        -e 's/--batch 512/--batch 32/g; s/\(bfloat16\|float32\) 128\b/\1 16/g; s/\(bfloat16\|float32\) 512\b/\1 32/g' \
        -e 's/--warmup 5/--warmup 1/g; s/--steps 20/--steps 2/g; s/--steps 10/--steps 2/g' \
        -e 's/--repeats 5/--repeats 2/g' \
        -e 's/--steps 5 /--steps 1 /g' \
        -e 's/--train-steps 300/--train-steps 5 --num-layers 8 --train-batch-size 16/' \
        -e 's/--eval-interval 100/--eval-interval 2/' \
        -e 's/^    local name=\$1 cap=\$2$/    local name=$1 cap=$(($2 * 12))/' \
        -e 's/^ACCURACY_RUN_S=200$/ACCURACY_RUN_S=2400/'
}

if [[ "${1:-}" == "--shrink" ]]; then
    shrink
    exit 0
fi

cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=$(realpath -m "${1:-/tmp/device_check_rehearsal}")
COPY=$(mktemp -d "${TMPDIR:-/tmp}/rehearsal.XXXXXX")
trap 'rm -rf "$COPY"' EXIT

# the working tree as git sees it (tracked and untracked, not ignored), plus the data if prepared
git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T - | tar -xf - -C "$COPY"
for folder in .data .prev; do   # git-ignored: the prepared data; step options for DEVICE_CHECK_OPTIONS_FROM=.prev
    if [[ -d $folder ]]; then cp -r "$folder" "$COPY/"; fi
done
shrink < bench/device_check.sh > "$COPY/bench/device_check.sh"

ARCHIVE=""
for candidate in "$REPO/.data/cifar10-jpeg.tar.xz" "$REPO/../shared/data/cifar10-jpeg.tar.xz"; do
    if [[ -f "$candidate" ]]; then ARCHIVE=$candidate; break; fi
done
python3 -c "import PIL" 2>/dev/null || echo "rehearsal: no Pillow here: the cifar stage will fail (pip install pillow)"

mkdir -p "$OUT_DIR"
echo "rehearsal: $COPY (shrunk device_check.sh), output $OUT_DIR"
cd "$COPY"
SHORT_RUN="--num-layers 8 --epochs 0.05"
# the emulated GPU's libcuda.so.1: the driver function --stream-priorities calls (tests/emulated_gpu/cuda_driver_stub.cpp)
DRIVER_STUB=$(cd tests/emulated_gpu && python3 -c "import kernel_runner; print(kernel_runner.build_driver_stub())")
LD_LIBRARY_PATH="$DRIVER_STUB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
PYTHONPATH="$COPY/tests/emulated_gpu${PYTHONPATH:+:$PYTHONPATH}" CUPYNET_EMULATED_GPUS=1 OUT="$OUT_DIR" \
    DEVICE_CHECK_SKIP="${DEVICE_CHECK_SKIP-install,gpu_tests}" DEVICE_CHECK_ACCURACY="${DEVICE_CHECK_ACCURACY-1}" \
    DEVICE_CHECK_ACCURACY_ARGS="${DEVICE_CHECK_ACCURACY_ARGS-"$SHORT_RUN --seed 0;$SHORT_RUN --seed 1"}" \
    DEVICE_CHECK_BUDGET="${DEVICE_CHECK_BUDGET-12000}" bash bench/device_check.sh ${ARCHIVE:+"$ARCHIVE"}
