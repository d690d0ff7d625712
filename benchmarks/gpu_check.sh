#!/usr/bin/env bash
# The GPU check: run it once, as one command, on a machine with a CUDA GPU (about 6-8 minutes on one H100).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Stages, each logged to OUT_DIR/<stage>.log (the speed stages also write JSON there); a failed stage
# does not stop the next, and the last line names the failed ones:
#   machine     GPU, driver, torch, Python;
#   tests       the GPU-against-CPU tests (tests/test_cuda.py) and the kernel and layer tests;
#   speed       bench_speed.py, the main target first: a DC iteration at ipc 10 on CIFAR10-shaped data,
#               loop/plain beside loop/fast, batched/fast and batched/fast/bf16;
#   condense    a short main.py run on the embedded digits data (DC, ipc 10, 20 iterations, 5 models),
#               into GPU_CHECK_RUN_DIR (default /tmp/gpu_check_run);
#   speed_more  bench_speed.py for DC and DM at ipc 1 and 50, the evaluation and the test pass.
# GPU_CHECK_DRY=1 only lists the commands; GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs a tiny version on a CPU.
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

stage machine python3 - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs, cudnn",
          torch.backends.cudnn.version())
else:
    print("no CUDA device")
PY
stage tests env DCBS_TEST_DEVICE="$DEV" python3 -m pytest -q -x tests/test_cuda.py tests/test_fast_ops.py \
    tests/test_kernels.py tests/test_precision.py -k "not command_line"

if [ "$QUICK" = 1 ]; then
    SPEED=(--shapes FashionMNIST --ipcs 1 --methods DC --paths loop/plain loop/fast --repeats 1 --no_eval)
    MORE=(--shapes FashionMNIST --ipcs 1 --methods DM --paths loop/plain batched/fast --repeats 1 --no_eval)
    RUN=(--Iteration 2 --eval_every 2 --num_eval 1 --ipc 1)
else   # a stage that runs out of time keeps the JSON of the groups it finished
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
