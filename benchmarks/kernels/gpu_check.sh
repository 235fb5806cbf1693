#!/usr/bin/env bash
# GPU check of the medusa_vllm kernels, run from anywhere on the GPU machine (H100, no network):
#   1. build medusa_vllm._C in place with the CUDA kernels
#   2. pytest tests/kernels (CPU + CUDA cases)
#   3. compute-sanitizer memcheck on a small case (benchmarks/kernels/memcheck_case.py)
#   4. the benchmark (benchmarks/kernels/tree_attention.py) -> $OUT/tree_attention_<gpu>.{json,png}
# Logs and results go to $OUT (default ./out); $OUT/summary.txt has one line per step.
# Each step has a timeout and the benchmark gets what is left of DEADLINE_S (450 s), so the whole
# script stays under 8 minutes.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MEDUSA_VLLM_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
DEADLINE_S="${DEADLINE_S:-450}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S LOG COMMAND...
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s log=$(basename "$log")" | tee -a "$SUMMARY"
  tail -n 5 "$log"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  command -v nvcc && nvcc --version | tail -n 1
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# a prebuilt extension carried along (built elsewhere for this torch) is used as is
if [ "${SKIP_BUILD:-0}" = 1 ] && "$PY" -c "import torch, medusa_vllm.kernels; assert torch._C._dispatch_has_kernel_for_dispatch_key('medusa_vllm::tree_attention', 'CUDA')" 2>/dev/null; then
  echo "build skipped: the carried medusa_vllm/_C.abi3.so has CUDA kernels" | tee -a "$SUMMARY"
else
  step build 150 "$OUT/build.log" "$PY" setup.py build_ext --inplace || { echo "build failed"; exit 1; }
fi
"$PY" -c "import medusa_vllm.kernels as k; assert k.have_extension(), k.extension_error(); print('extension loaded')" \
  | tee -a "$SUMMARY"

step pytest 100 "$OUT/pytest.log" "$PY" -m pytest tests/kernels -x -q -p no:cacheprovider --noconftest -rs

SANITIZER="$(command -v compute-sanitizer || true)"
[ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
if [ -n "$SANITIZER" ]; then
  # no caching allocator: memcheck then sees each tensor's own bounds
  step memcheck 60 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 "$PY" benchmarks/kernels/memcheck_case.py
else
  echo "memcheck skipped: compute-sanitizer not found" | tee -a "$SUMMARY"
  step memcheck_case_without_sanitizer 40 "$OUT/memcheck.log" "$PY" benchmarks/kernels/memcheck_case.py
fi

# Whatever is left of DEADLINE_S goes to the benchmark (it stops measuring at its budget).
left=$((DEADLINE_S - SECONDS))
step benchmark "$left" "$OUT/benchmark.log" "$PY" benchmarks/kernels/tree_attention.py --out "$OUT" \
  --time-budget $((left > 90 ? left - 45 : 45))
echo "== done: $SUMMARY"
cat "$SUMMARY"
