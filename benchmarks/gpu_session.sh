#!/usr/bin/env bash
# One call on a lent GPU: versions, the CUDA extension build, the kernel tests on the GPU, the report.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--quick]     # extra arguments go to maskdit_fast.bench
#   OUT=/some/dir SKIP_TESTS=1 REPORT_TIMEOUT=540 bash benchmarks/gpu_session.sh \
#       --sections peaks,train_step,profile --budget train_step=360    # the train-step table, compile rows
#
# Correctness runs before any timing. The csrc/ build (`pip install --no-build-isolation -e .`, as the
# README says) runs in the background while the Triton tests run from the checkout (the package finds
# kernels/ without an install); SKIP_TESTS=1 skips the tests (not the build: the fused rows need it).
# Each phase has a wall-clock cap so a hang cannot eat the lease (the report's: REPORT_TIMEOUT, default
# 480 s); logs land in $OUT (the device tool brings back at most 8 files) and a summary is printed last.
# Seen on an H200 (2026-11-26): build 33-42 s, Triton GPU tests ~80 s, `--quick` report ~50 s before the
# train-step rows grew. Expected now (estimates, not yet measured): `--quick` ~6 min in all (its report
# ~3 min: eager train rows at 256 / 512 px, fit and common batch, and the profile); the train-step
# table ~9.5 min (build ~40 s, then the budget given: eager XL rows ~10-15 s each, compiled ones ~40-90 s
# of compilation each; rows past the budget are reported as skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
py=python3
start=$(date +%s)
stamp() { echo "[gpu_session] $1 at +$(( $(date +%s) - start ))s"; }
# Tests of the kernels and of the code that reaches them: on a GPU machine they run on the GPU.
KERNEL_TESTS="tests/test_ops_gather_scatter.py tests/test_ops_modulate.py tests/test_attention.py
  tests/test_ops_gpu.py tests/test_attention_gpu.py tests/test_kernel_tuning.py
  tests/test_packed.py tests/test_models.py tests/test_backend.py tests/test_package.py"
# These also need the built extension (the model test compares backend "cuda" with torch too).
EXTENSION_TESTS="tests/test_ops_cuda.py tests/test_ops_cuda_gpu.py tests/test_ops_model.py tests/test_ops_residual_modulate.py"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $py -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'(CUDA', torch.version.cuda, ') | triton', triton.__version__, '|', torch.cuda.get_device_name(),
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  nvcc --version | tail -n 1
} 2>&1 | tee "$OUT/env.txt"

( TIMEFORMAT="build wall %Rs"; time $py -m pip install --no-deps --no-build-isolation --no-input -e . ) \
  > "$OUT/build.log" 2>&1 &
build_pid=$!

kernels_rc=skipped cuda_rc=skipped
if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "kernel tests (Triton, on the GPU)"
  # shellcheck disable=SC2086
  timeout 300 $py -m pytest -q -p no:cacheprovider -n 8 --timeout 240 $KERNEL_TESTS > "$OUT/tests_kernels.log" 2>&1
  kernels_rc=$?
fi

stamp "waiting for the CUDA build"
wait "$build_pid"; build_rc=$?
tail -n 2 "$OUT/build.log"

if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "CUDA extension tests"
  # shellcheck disable=SC2086
  timeout 180 $py -m pytest -q -p no:cacheprovider -n 4 --timeout 150 $EXTENSION_TESTS > "$OUT/tests_cuda.log" 2>&1
  cuda_rc=$?
fi

stamp "GPU report"
timeout "${REPORT_TIMEOUT:-480}" $py -m maskdit_fast.bench --sections peaks,ops,attention,train_step,profile \
  --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -E "FAILED|failed check|rror" "$OUT/bench.log" | head -n 20
grep -E "^\| (MaskDiT|DiT)|^- [0-9]+ px|^\| (gemm|attention|glue|optimizer|idle|elementwise|other)|GEMMs alone|\[bench\]" \
  "$OUT/bench.log"

stamp "done"
echo "== summary: build rc=$build_rc  kernel tests rc=$kernels_rc  cuda tests rc=$cuda_rc  bench rc=$bench_rc"
grep -shE "^(FAILED|ERROR)" "$OUT/tests_kernels.log" "$OUT/tests_cuda.log" | head -n 30
grep -shE "passed|failed" "$OUT/tests_kernels.log" "$OUT/tests_cuda.log" | tail -n 2
grep -h "build wall" "$OUT/build.log"
