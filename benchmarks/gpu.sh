#!/usr/bin/env bash
# The GPU check of ossnet, one command on a machine with one CUDA GPU (about 6-8 minutes on one GPU):
#   1. the device-dependent tests (pytest -m device) on CUDA: Padé kernels (eager and torch.compile'd),
#      folded decoder, decoder recomputation, no host-device synchronisation while decoding;
#   2. benchmarks/memory.py and benchmarks/speed.py with --device cuda (--quick: *-cuda-quick files);
#   3. ossnet synth -> train -> predict on CUDA (one run in float32, one in bf16 with compiled Padé units);
#   4. train -> kill -9 -> train --resume -> predict on CUDA (the resumed run must finish every epoch);
#   5. torchrun with one process: an NCCL all-reduce, then `ossnet train` under torchrun.
# Writes gpu.log, summary.txt and the benchmark tables to $OUT when set, else to runs/gpu; scratch data
# goes to a temporary folder. Stops at the first failure with a message naming the step (exit code != 0),
# and fails at once when torch sees no CUDA device.
#
#   bash benchmarks/gpu.sh            (PYTHON=... to choose the interpreter; default .venv/bin/python or python3)
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-runs/gpu}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ossnet-gpu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT_DIR/gpu.log") 2>&1
STARTED=$SECONDS

CURRENT_STEP="start"
step() { CURRENT_STEP="$*"; echo; echo "=== [$((SECONDS - STARTED)) s] $*"; }
fail() { echo "gpu.sh: FAILED at step '$CURRENT_STEP': $*" >&2; exit 1; }
trap 'status=$?; [[ $status -eq 0 ]] || echo "gpu.sh: FAILED at step: $CURRENT_STEP (exit $status)" >&2' ERR
ossnet() { "$PYTHON" -m ossnet "$@"; }
summary() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }
: > "$OUT_DIR/summary.txt"

step "CUDA device"
"$PYTHON" - <<'EOF' || fail "torch sees no CUDA device: this script needs a GPU (use the CPU test suite instead)"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}: torch.cuda.is_available() is False")
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

step "device-dependent tests on CUDA"
OSSNET_TEST_DEVICE=cuda timeout 300 "$PYTHON" -m pytest -q -m device -p no:cacheprovider tests/models
summary "tests: pytest -m device tests/models passed on CUDA"

step "memory benchmark on CUDA"
timeout 300 "$PYTHON" benchmarks/memory.py --device cuda --quick --recompute-rounds 1
step "speed benchmark on CUDA"
timeout 300 "$PYTHON" benchmarks/speed.py --device cuda --quick --repeats 1
for name in memory speed; do
    cp "docs/benchmarks/$name-cuda-quick.md" "docs/benchmarks/$name-cuda-quick.json" "$OUT_DIR/"
done
summary "benchmarks: memory-cuda-quick.md and speed-cuda-quick.md written"

TRAIN=(--model ossnet-c --batch-size 2 --locations 4096 --device cuda --override decoder_width=128)
check_prediction() {  # folder with predicted masks of every case of the dataset
    local count
    count=$(find "$1" -name '*.nii.gz' ! -name '*_prob.nii.gz' | wc -l)
    [[ $count -ge 4 ]] || fail "expected a mask per case in $1, found $count"
}

step "synth -> train -> predict on CUDA (float32)"
ossnet synth --layout brats --cases 4 --shape 64 64 48 -o "$WORK/data"
ossnet train --data "$WORK/data" -o "$WORK/fp32" --epochs 2 --val-every 2 "${TRAIN[@]}"
ossnet predict -c "$WORK/fp32/best.pt" -i "$WORK/data" -o "$WORK/fp32-predicted" --device cuda
check_prediction "$WORK/fp32-predicted"
summary "train + predict fp32: $(tail -n 1 "$WORK/fp32/metrics.csv")"

step "train on CUDA in bf16 with compiled Padé units, predict"
ossnet train --data "$WORK/data" -o "$WORK/bf16" --epochs 2 --val-every 2 --precision bf16 "${TRAIN[@]}" \
    --override compile=true
ossnet predict -c "$WORK/bf16/best.pt" -i "$WORK/data" -o "$WORK/bf16-predicted" --device cuda
check_prediction "$WORK/bf16-predicted"
summary "train + predict bf16, compiled: $(tail -n 1 "$WORK/bf16/metrics.csv")"

step "train -> kill -9 -> resume -> predict on CUDA"
# the interpreter itself in the background (not the shell function), so that $! is the trainer's process
"$PYTHON" -m ossnet train --data "$WORK/data" -o "$WORK/resumed" --epochs 6 --val-every 6 "${TRAIN[@]}" &
TRAINER=$!
for _ in $(seq 600); do  # kill it once its first epoch is saved
    [[ -f "$WORK/resumed/last.pt" ]] && break
    kill -0 "$TRAINER" 2>/dev/null || fail "training ended before saving last.pt"
    sleep 0.5
done
[[ -f "$WORK/resumed/last.pt" ]] || fail "no last.pt after 300 s"
kill -9 "$TRAINER"
wait "$TRAINER" 2>/dev/null || true
killed_at=$(($(wc -l < "$WORK/resumed/metrics.csv") - 1))
ossnet train --data "$WORK/data" -o "$WORK/resumed" --epochs 6 --val-every 6 --resume "${TRAIN[@]}"
epochs=$(($(wc -l < "$WORK/resumed/metrics.csv") - 1))
[[ $epochs -eq 6 ]] || fail "resumed run has $epochs epochs in metrics.csv, expected 6"
ossnet predict -c "$WORK/resumed/best.pt" -i "$WORK/data" -o "$WORK/resumed-predicted" --device cuda
check_prediction "$WORK/resumed-predicted"
summary "kill -9 after $killed_at epoch(s), resumed to 6: $(tail -n 1 "$WORK/resumed/metrics.csv")"

step "torchrun, one process, NCCL"
cat > "$WORK/nccl_check.py" <<'EOF'
import os
import torch
import torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
value = torch.ones(3, device="cuda")
dist.all_reduce(value)
assert dist.get_backend() == "nccl" and value.tolist() == [1.0, 1.0, 1.0], value
dist.destroy_process_group()
print("nccl all_reduce on one process: ok")
EOF
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 "$WORK/nccl_check.py"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m ossnet train --data "$WORK/data" \
    -o "$WORK/torchrun" --epochs 1 --val-every 1 "${TRAIN[@]}"
[[ -f "$WORK/torchrun/best.pt" ]] || fail "torchrun training wrote no best.pt"
summary "torchrun --nproc_per_node 1: nccl all-reduce and ossnet train ok"

step "done"
summary "gpu.sh passed in $((SECONDS - STARTED)) s"
