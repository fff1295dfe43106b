#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script that a session lent a GPU runs as it is (at most
# about 10 minutes on one H100), from the repository root:
#
#   benchmarks/gpu_check.sh                  # on the GPU machine; logs under $OUT if set, else gpu_check_logs/
#   CHECK_ON_CPU=1 benchmarks/gpu_check.sh   # every step tiny on the CPU: proves the commands parse
#
# Steps, each under its own timeout, each printing its figures and its exit status:
#   1. the GPU (nvidia-smi) and what torch sees of it (bf16, what --amp auto picks)
#   2. the tests with CUDA branches: every test run on the `device` fixture's cuda, the tests named
#      for CUDA, and tests/test_host_syncs.py (the training step under set_sync_debug_mode('error'))
#   3. benchmarks/train_bench.py at real size: ResNet-50, 224 px, batch 64, bf16 (and, as it does on
#      CUDA, ResNet-50 in fp32 and bf16, contiguous and channels-last)
#   4. train.py for one epoch on the synthetic set at 224 px (ResNet-50, --amp auto), then one
#      short --compile run (torch.compile under the TF32 flags train.py sets)
# The script goes on after a failed step and exits non-zero at the end if any failed.
set -u
cd "$(dirname "$0")/.." || exit 2
LOGS=${OUT:-gpu_check_logs}
mkdir -p "$LOGS"
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
FAILED=()

if [ "${CHECK_ON_CPU:-0}" = 1 ]; then
    echo "CHECK_ON_CPU=1: every step tiny on the CPU, to check the commands; no figure here means anything"
    DEVICE=(--device cpu)
    TESTS=(tests/test_gpu_path.py -k "cuda and not two_ranks")
    BENCH=(--backbone_type resnet18 --image_size 32 --batch_size 8 --amp none --num_workers 0 --epochs 1)
    RUN=(--backbone_type resnet18 --image_size 32 --batch_size 10 --num_workers 0 --amp none)
    COMPILE=(--backbone_type resnet18 --image_size 32 --batch_size 10 --num_workers 0 --amp none)
    LIMIT=300
else
    if ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu_check.sh: torch.cuda.is_available() is False here: nothing to check without a CUDA GPU" \
             "(CHECK_ON_CPU=1 runs the steps tiny on the CPU)" >&2
        exit 3
    fi
    DEVICE=(--device cuda)
    TESTS=(tests/ -k "cuda or host_syncs")
    BENCH=(--backbone_type resnet50 --image_size 224 --batch_size 64 --amp bf16 --num_workers 8 --epochs 2
           --source_size 256)
    RUN=(--backbone_type resnet50 --image_size 224 --batch_size 64 --num_workers 8)
    COMPILE=(--backbone_type resnet18 --image_size 64 --batch_size 64 --num_workers 8)
    LIMIT=0  # each step's own
fi

step() {  # step NAME SECONDS COMMAND...: run it under `timeout`, its output shown and kept in $LOGS/NAME.log
    local name=$1 seconds=$2
    shift 2
    [ "$LIMIT" -gt 0 ] && seconds=$LIMIT
    echo
    echo "=== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=20 "$seconds" "$@" 2>&1 | tee "$LOGS/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - start))s$([ "$status" = 124 ] && echo ' (timed out)')"
    [ "$status" = 0 ] || FAILED+=("$name")
}

if [ "${CHECK_ON_CPU:-0}" != 1 ]; then
    step gpu 20 nvidia-smi
fi
step torch 30 python3 -c '
import torch
from utils import computes_bf16, resolve_amp
device = "cuda" if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if device == "cuda":
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("bf16 in hardware:", computes_bf16(device), "--amp auto runs:", resolve_amp("auto", device))'
step tests 150 python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step train_bench 150 python3 benchmarks/train_bench.py "${DEVICE[@]}" "${BENCH[@]}" --data_path "$DATA/bench" \
    --out "$LOGS/train_bench.md"
step train_epoch 120 python3 train.py --data_path "$DATA/run" --data_name synthetic --pretrained none --num_epochs 1 \
    "${DEVICE[@]}" "${RUN[@]}" --output_dir "$DATA/results"
step train_compile 120 python3 train.py --data_path "$DATA/run" --data_name synthetic --pretrained none \
    --num_epochs 1 --compile "${DEVICE[@]}" "${COMPILE[@]}" --output_dir "$DATA/compiled"

echo
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check.sh: failed: ${FAILED[*]} (logs in $LOGS/)"
    exit 1
fi
echo "gpu_check.sh: every step passed (logs in $LOGS/)"
