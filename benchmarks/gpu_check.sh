#!/usr/bin/env bash
# The prepared GPU check: run it once, as one command, on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # about 6-8 minutes on one H100/H200
#
# 1. what the machine is (GPU, driver, torch, Python);
# 2. the tests that compare the GPU with the CPU (tests/test_cuda.py: layers, DC/DSA/DM steps,
#    the batched kernel, batched evaluation, main.py and main_BS.py end to end on the GPU) and
#    the CPU-side kernel and layer tests;
# 3. bench_speed.py on CUDA, the main target first: a DC iteration at ipc 10 on CIFAR10-shaped
#    random data along the straightforward path (loop/plain) beside loop/fast, batched/fast and
#    batched/fast/bf16 (--precision bf16),
#    with medians, GFLOP/s and peak GPU memory (JSON in OUT_DIR);
# 4. a short condensation run on the embedded digits data (DC, ipc 10, 20 iterations, 5 models),
#    timed as a user would run it;
# 5. as time allows, bench_speed.py for DC and DM at ipc 1 and 50, the evaluation and test pass.
# Every stage writes its log to OUT_DIR (seven files in all; the run itself goes to
# GPU_CHECK_RUN_DIR, default /tmp/gpu_check_run) and the script goes on after a failed stage; the
# last line says which stages failed; it fits a 10-minute limit. GPU_CHECK_DEVICE=cpu with
# GPU_CHECK_QUICK=1 dry-runs it on a CPU
# (a check of the script, not of a GPU); GPU_CHECK_DRY=1 only lists the stages' commands.
set -u
OUT=${1:-${OUT:-results/bench/gpu_check}}
DEV=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DCBS_NO_DOWNLOAD=1
failed=()
stage() {  # stage NAME COMMAND...: runs it, tees its log, records a failure
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name: $*"
    if [ "$DRY" = 1 ]; then return; fi   # only list the commands
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

stage machine python3 - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
    print("cudnn", torch.backends.cudnn.version(), "tf32 conv", torch.backends.cudnn.allow_tf32)
else:
    print("no CUDA device")
EOF

stage tests env DCBS_TEST_DEVICE="$DEV" python3 -m pytest -q -x tests/test_cuda.py tests/test_fast_ops.py \
    tests/test_kernels.py tests/test_precision.py -k "not command_line"

if [ "$QUICK" = 1 ]; then
    SPEED=(--shapes FashionMNIST --ipcs 1 --methods DC --paths loop/plain loop/fast --repeats 1 --no_eval)
    MORE=(--shapes FashionMNIST --ipcs 1 --methods DM --paths loop/plain batched/fast --repeats 1 --no_eval)
    RUN=(--Iteration 2 --eval_every 2 --num_eval 1 --ipc 1)
else   # first the main GPU target (DC, ipc 10, CIFAR10 shape), then the rest as time allows
    SPEED=(--shapes CIFAR10 --ipcs 10 --methods DC --paths loop/plain loop/fast batched/fast batched/fast/bf16
           --repeats 3 --no_eval --timeout 240)
    MORE=(--shapes CIFAR10 --ipcs 1 50 --methods DC DM --paths loop/plain batched/fast --repeats 3 --timeout 240
          --compile)
    RUN=(--Iteration 20 --eval_every 20 --num_eval 5 --ipc 10)
fi
stage speed python3 benchmarks/bench_speed.py --device "$DEV" "${SPEED[@]}" --out "$OUT/speed_$DEV.json"
RUN_DIR=${GPU_CHECK_RUN_DIR:-/tmp/gpu_check_run}   # outside OUT_DIR: OUT_DIR keeps to the stages' logs and JSON
[ "$DRY" = 1 ] || rm -rf "$RUN_DIR/dc_digits"   # this script's own scratch run
stage condense python3 main.py --dataset digits --method DC --num_exp 1 "${RUN[@]}" \
    --device "$DEV" --save_path "$RUN_DIR" --run_name dc_digits

stage speed_more python3 benchmarks/bench_speed.py --device "$DEV" "${MORE[@]}" --out "$OUT/speed_more_$DEV.json"

echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
