#!/usr/bin/env bash
# Prepare, on a machine with a package index, what bench/device_check.sh needs on a GPU machine without one:
#
#     bash bench/prepare_device_run.sh [path/to/shared/data]       # default ../shared/data beside the repo
#
# * .whl/: the cuDNN Frontend wheel for the GPU machine's Python 3.12 (the shared GPU notes' `pip download`
#   line; the machine has CuPy, cuDNN, NCCL and ml_dtypes but not the Frontend);
# * .data/: the CIFAR-10 JPEG archive and its converter (device_check.sh finds them there).
# Both folders are git-ignored: the device tool takes them along when its call names them in `carry`
# (".whl", ".data"; about 21 MB together, under its 64 MiB limit). Run it again at will: it keeps what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
FRONTEND=nvidia-cudnn-frontend==1.22.1     # 1.22-1.26 work; 1.27+ pulls in cutlass-dsl and tvm-ffi

# the archive first: a wrong folder stops the script before anything is downloaded or written
for name in cifar10-jpeg.tar.xz cifar10_from_jpeg.py; do
    if [[ ! -f "$DATA/$name" ]]; then
        echo "error: no $DATA/$name (give the folder holding the CIFAR-10 JPEG archive as argument 1)" >&2
        exit 2
    fi
done

shopt -s nullglob
wheels=(.whl/nvidia_cudnn_frontend-*.whl)
if ((${#wheels[@]} == 0)); then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl "$FRONTEND"
fi

mkdir -p .data
install -m 0644 "$DATA/cifar10-jpeg.tar.xz" .data/     # writable copies (the shared folder is read-only):
install -m 0755 "$DATA/cifar10_from_jpeg.py" .data/    # a second run replaces them

ls -l .whl/*.whl .data/
echo "ready: carry [\".whl\", \".data\"] and run bash bench/device_check.sh .data/cifar10-jpeg.tar.xz"
