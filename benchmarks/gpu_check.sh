#!/usr/bin/env bash
# The GPU check on a CUDA machine: bash benchmarks/gpu_check.sh [OUT_DIR]. Stages, each logged to OUT_DIR/<stage>.log,
# a failed one not stopping the next: machine; tests (tests/test_cuda.py, kernel and layer tests against the CPU);
# speed (bench_speed.py, DC at ipc 10 on CIFAR10-shaped data, loop/plain beside the batched and bf16 paths); condense
# (main.py, DC on the embedded digits, into GPU_CHECK_RUN_DIR); speed_more (DC and DM at ipc 1 and 50, the evaluation
# and the test pass). Speed stages stop after 240 s, keeping the JSON of the groups they finished.
# GPU_CHECK_DRY=1 lists the commands; GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs a tiny version on a CPU.
set -u
OUT=${1:-${OUT:-results/bench/gpu_check}}
DEV=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
DRY=${GPU_CHECK_DRY:-0}
RUN_DIR=${GPU_CHECK_RUN_DIR:-/tmp/gpu_check_run}
[ "$DRY" = 1 ] || mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DCBS_NO_DOWNLOAD=1
failed=()
stage() {  # stage NAME COMMAND...: runs it, tees its log, records a failure
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name: $*"
    [ "$DRY" = 1 ] && return
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

INFO='import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda",'
INFO+=' torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_properties(0)'
INFO+=' if torch.cuda.is_available() else "no CUDA device")'
stage machine python3 -c "$INFO"
stage tests env DCBS_TEST_DEVICE="$DEV" python3 -m pytest -q -x tests/test_cuda.py tests/test_fast_ops.py \
    tests/test_kernels.py tests/test_precision.py -k "not command_line"

if [ "$QUICK" = 1 ]; then
    SPEED=(--shapes FashionMNIST --ipcs 1 --methods DC --paths loop/plain loop/fast --repeats 1 --no_eval)
    MORE=(--shapes FashionMNIST --ipcs 1 --methods DM --paths loop/plain batched/fast --repeats 1 --no_eval)
    RUN=(--Iteration 2 --eval_every 2 --num_eval 1 --ipc 1)
else
    SPEED=(--shapes CIFAR10 --ipcs 10 --methods DC --paths loop/plain loop/fast batched/fast batched/fast/bf16
           --repeats 3 --no_eval)
    MORE=(--shapes CIFAR10 --ipcs 1 50 --methods DC DM --paths loop/plain batched/fast --repeats 3 --compile)
    RUN=(--Iteration 20 --eval_every 20 --num_eval 5 --ipc 10)
fi
stage speed timeout 240 python3 benchmarks/bench_speed.py --device "$DEV" "${SPEED[@]}" --out "$OUT/speed_$DEV.json"
[ "$DRY" = 1 ] || rm -rf "$RUN_DIR/dc_digits"   # this script's own scratch run
stage condense python3 main.py --dataset digits --method DC --num_exp 1 "${RUN[@]}" \
    --device "$DEV" --save_path "$RUN_DIR" --run_name dc_digits
stage speed_more timeout 240 python3 benchmarks/bench_speed.py --device "$DEV" "${MORE[@]}" \
    --out "$OUT/speed_more_$DEV.json"

echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
