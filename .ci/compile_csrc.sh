#!/usr/bin/env bash
# CI: compile-only check of csrc/ (the "cuda" back-end) against the installed CUDA build of torch,
# through setup.py exactly as `pip install --no-build-isolation -e .` builds it, into a temporary
# directory (nothing lands in the source tree). No GPU needed. Then runs the CPU tests that need the
# built library (registered schemas, fake impls, wrapper validation) with MASKDIT_FAST_EXTENSION.
#
# Fails on a compile error, on a build that is silently skipped (no CUDA torch / no nvcc), or when
# the build exceeds COMPILE_BUDGET_S seconds (default 600; seen 142-281 s on 2 loaded cores). TORCH_CUDA_ARCH_LIST defaults to 9.0
# (one architecture keeps it quick); MAX_JOBS defaults to the number of cores.
set -euo pipefail
cd "$(dirname "$0")/.."

budget="${COMPILE_BUDGET_S:-600}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

python - <<'EOF'
import sys

import torch
from torch.utils.cpp_extension import CUDA_HOME

if torch.version.cuda is None or CUDA_HOME is None:
    sys.exit(f"compile_csrc: needs a CUDA build of torch and nvcc (torch {torch.__version__}, "
             f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
print(f"compile_csrc: torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
EOF

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
start=$(date +%s)
if ! timeout "$budget" python setup.py build_ext --build-temp "$build/tmp" --build-lib "$build/lib"; then
  echo "compile_csrc: FAILED (compile error, or over the ${budget}s budget) after $(( $(date +%s) - start ))s" >&2
  exit 1
fi
echo "compile_csrc: built in $(( $(date +%s) - start ))s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"

lib="$(find "$build/lib" -name '_C*.so' | head -n 1)"
if [ -z "$lib" ]; then
  echo "compile_csrc: FAILED: setup.py built no maskdit_fast._C (see its 'CUDA extension skipped' line)" >&2
  exit 1
fi
MASKDIT_FAST_EXTENSION="$lib" python -m pytest -q tests/test_ops_cuda.py
MASKDIT_FAST_EXTENSION="$lib" python -m pytest -q tests/test_ops_residual_modulate.py -k cuda
