#!/usr/bin/env bash
# One call on a lent GPU: versions, the CUDA extension build, every GPU test, then the GPU report.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--quick]
#
# Correctness runs before any timing. The csrc/ build (`pip install --no-build-isolation -e .`, as
# the README says) runs in the background while the Triton tests run, since neither needs the other.
# Each phase has a wall-clock cap so a hang cannot eat the lease; every phase's log lands in $OUT
# (at most 8 files: the device tool brings back no more) and a summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
py=python3
start=$(date +%s)
stamp() { echo "[gpu_session] $1 at +$(( $(date +%s) - start ))s"; }

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

stamp "Triton GPU tests"
timeout 240 $py -m pytest -m gpu -q -p no:cacheprovider -n 4 --timeout 200 \
  tests/test_ops_gather_scatter.py tests/test_ops_modulate.py tests/test_attention.py 2>&1 | tee "$OUT/tests_triton.log"
triton_rc=${PIPESTATUS[0]}

stamp "waiting for the CUDA build"
wait "$build_pid"; build_rc=$?
tail -n 3 "$OUT/build.log"

stamp "CUDA GPU tests"
timeout 180 $py -m pytest -m gpu -q -p no:cacheprovider -n 4 --timeout 150 tests/test_ops_cuda.py 2>&1 \
  | tee "$OUT/tests_cuda.log"
cuda_rc=${PIPESTATUS[0]}

stamp "GPU report"
timeout 360 $py -m maskdit_fast.bench "$@" --sections peaks,checks,ops,attention,train_step --out "$OUT" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -E "FAILED|error|not available" "$OUT/bench.log" | head -n 30
tail -n 40 "$OUT/bench.log"

stamp "done"
echo "== summary: build rc=$build_rc  triton tests rc=$triton_rc  cuda tests rc=$cuda_rc  bench rc=$bench_rc"
grep -hE "passed|failed|error" "$OUT/tests_triton.log" "$OUT/tests_cuda.log" | tail -n 4
grep -h "build wall" "$OUT/build.log"
