#!/usr/bin/env bash
# One call on a lent GPU, in the playbook's priority order: versions, the CUDA extension build, the kernel
# tests on the GPU (correctness before any timing), the report (op tables, the train-step table, the step
# profile), then the Triton tuning sweep in whatever time is left.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--quick]     # extra arguments go to maskdit_fast.bench
#   OUT=/some/dir SKIP_TESTS=1 SESSION_S=560 bash benchmarks/gpu_session.sh \
#       --sections peaks,train_step,profile --budget train_step=360    # the train-step table, compile rows
#
# SESSION_S (default 540) is the wall-clock budget of the whole call: each phase runs under a cap of its own
# and of what is left, so a hang cannot eat the lease, and the sweep (benchmarks/tune_gpu.py, which checks
# its deadline before every config and writes as it goes) gets the rest; SWEEP=0 skips it. Wheels in the
# git-ignored wheels/ (torchao for the fp8 rows, liger-kernel for the sweep's LayerNorm baseline; the image
# has no network: carry the folder) are installed with --no-deps into /tmp/site first.
# The csrc/ build (`pip install --no-build-isolation -e .`, as the README says) runs in the background while
# the Triton tests run from the checkout (the package finds kernels/ without an install); SKIP_TESTS=1 skips
# the tests (not the build: the fused rows need it).
# The device tool brings back at most 8 files of $OUT: session.log (versions, build, the phases' times),
# tests.log, bench.log, the report's .md and .json, and the sweep's sweep.md, best.json and sweep.jsonl.
# Seen on an H200 (2026-11-26): build 33-42 s, Triton GPU tests ~80 s, `--quick` report ~50 s before the
# train-step rows grew. Expected now (estimates, not yet measured): tests ~3 min with the fused kernels'
# cases; `--quick` report ~3 min (eager train rows at 256 / 512 px, fit and common batch, and the profile);
# the full train-step table ~6 min with `--budget train_step=360` (eager XL rows ~10-15 s each, compiled
# ones ~40-90 s of compilation each; rows past the budget are reported as skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$OUT"
SESSION_S="${SESSION_S:-540}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
py=python3
start=$(date +%s)
log="$OUT/session.log"
stamp() { echo "[gpu_session] $1 at +$(( $(date +%s) - start ))s" | tee -a "$log"; }
left() { echo $(( SESSION_S - ($(date +%s) - start) )); }
cap() { local l m; l=$(left); m=$(( $1 < l ? $1 : l )); echo $(( m > 1 ? m : 1 )); }  # min(cap, time left), >= 1 s
# Tests of the kernels and of the code that reaches them: on a GPU machine they run on the GPU.
KERNEL_TESTS="tests/test_ops_gather_scatter.py tests/test_ops_modulate.py tests/test_attention.py
  tests/test_ops_gpu.py tests/test_attention_gpu.py tests/test_kernel_tuning.py
  tests/test_packed.py tests/test_models.py tests/test_backend.py tests/test_package.py"
# These also need the built extension (the model test compares backend "cuda" with torch too).
EXTENSION_TESTS="tests/test_ops_cuda.py tests/test_ops_cuda_gpu.py tests/test_ops_model.py tests/test_ops_residual_modulate.py"

site=""
if compgen -G "wheels/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
    >> "$log" 2>&1 && site=/tmp/site
fi
export PYTHONPATH="$PWD${site:+:$site}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $py -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'(CUDA', torch.version.cuda, ') | triton', triton.__version__, '|', torch.cuda.get_device_name(),
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  $py -c "import importlib.metadata as m
for name in ('torchao', 'liger-kernel'):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, 'absent')"
  nvcc --version | tail -n 1
} 2>&1 | tee -a "$log"

build_log=/tmp/gpu_session_build.log
( TIMEFORMAT="build wall %Rs"; time timeout 300 $py -m pip install --no-deps --no-build-isolation --no-input -e . ) \
  > "$build_log" 2>&1 &
build_pid=$!

kernels_rc=skipped cuda_rc=skipped
if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "kernel tests (Triton, on the GPU)"
  # shellcheck disable=SC2086
  timeout "$(cap 240)" $py -m pytest -q -p no:cacheprovider -n 8 --timeout 200 $KERNEL_TESTS > "$OUT/tests.log" 2>&1
  kernels_rc=$?
fi

stamp "waiting for the CUDA build"
wait "$build_pid"; build_rc=$?
tail -n 20 "$build_log" >> "$log"; tail -n 2 "$build_log"

if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "CUDA extension tests"
  # shellcheck disable=SC2086
  timeout "$(cap 150)" $py -m pytest -q -p no:cacheprovider -n 4 --timeout 120 $EXTENSION_TESTS >> "$OUT/tests.log" 2>&1
  cuda_rc=$?
fi

stamp "GPU report"
sweep_reserve=$([ "${SWEEP:-1}" = 0 ] && echo 0 || echo 90)  # the sweep's minimum share of the call
report_s=$(( $(left) - sweep_reserve )); [ "$report_s" -lt 60 ] && report_s=60  # the report before the sweep
timeout "$(cap "$report_s")" $py -m maskdit_fast.bench \
  --sections peaks,ops,attention,train_step,profile --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -E "FAILED|failed check|rror" "$OUT/bench.log" | head -n 20
grep -E "^\| (MaskDiT|DiT)|^- [0-9]+ px|^\| (gemm|attention|glue|optimizer|idle|elementwise|other)|GEMMs alone|\[bench\]" \
  "$OUT/bench.log"

sweep_rc=skipped
if [ "${SWEEP:-1}" != 0 ] && [ "$(left)" -gt 90 ]; then
  # its deadline leaves room for a busy child's 30 s grace (tune_gpu.CHILD_GRACE_S) and the summary it writes
  stamp "tuning sweep ($(( $(left) - 45 )) s)"
  timeout "$(cap $(( $(left) - 5 )))" $py benchmarks/tune_gpu.py --out "$OUT/sweep" --deadline-s $(( $(left) - 45 )) \
    >> "$log" 2>&1
  sweep_rc=$?
fi

stamp "done"
echo "== summary: build rc=$build_rc  kernel tests rc=$kernels_rc  cuda tests rc=$cuda_rc  bench rc=$bench_rc  sweep rc=$sweep_rc" \
  | tee -a "$log"
grep -shE "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 30
grep -shE "passed|failed" "$OUT/tests.log" | tail -n 2
grep -h "build wall" "$build_log"
if [ -f "$OUT/sweep/sweep.md" ]; then head -n 40 "$OUT/sweep/sweep.md"; fi
