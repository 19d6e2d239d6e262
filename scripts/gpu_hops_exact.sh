#!/usr/bin/env bash
# hops=None forward in two passes (issue #19, branch hops-exact), on the GPU machine, ~190 s:
#   source scripts/device_env.sh && bash scripts/gpu_hops_exact.sh
# 1. GPU tests of numba_kernels/swr_exact.py (tests/test_gpu_exact.py at real sizes, and the
#    simulator cases of tests/test_kernels_exact.py run on the GPU);
# 2. `python -m swr_array bench --peers none --dtypes bf16 --hops 1,none` at 16x2048, 4x8192 and
#    1x32768, both layouts, then float32 BLHD (forward and forward+backward; the backward of
#    hops=None is still the multi-pass path).
# 3. scripts/hops_exact_sweep.py: the two passes' forward per TUNING variant (before 2, ~30 s).
# Writes $OUT/hops-exact/log.txt (everything printed, the Markdown tables included) and
# $OUT/hops-exact/bench.json (the bf16 run).
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/hops-exact"
mkdir -p "$dir"
log="$dir/log.txt"
scratch=$(mktemp -d)
repo=$(pwd)
{
  echo "=== tests $(date -u +%T)"
  timeout 70 python3 -m pytest -q -p no:cacheprovider -x \
    "$repo/tests/test_gpu_exact.py" "$repo/tests/test_kernels_exact.py"
  echo "=== tests rc=$? $(date -u +%T)"
  timeout 35 python3 "$repo/scripts/hops_exact_sweep.py" --seconds 25
  echo "=== sweep rc=$? $(date -u +%T)"
  (cd "$scratch" && timeout 60 python3 -m swr_array bench --peers none --dtypes bf16 \
    --hops 1,none --sizes 16x2048,4x8192,1x32768 --runs 5 --calls 10 --host-calls 0 \
    --time-budget 55 --no-plot --no-progress --out "$scratch" --markdown "$scratch/bf16.md")
  echo "=== bench bf16 rc=$? $(date -u +%T)"
  cat "$scratch/bf16.md" 2>/dev/null
  cp "$scratch/bench.json" "$dir/bench.json" 2>/dev/null
  mkdir -p "$scratch/f32"
  (cd "$scratch" && timeout 30 python3 -m swr_array bench --peers none --dtypes fp32 \
    --layouts BLHD --hops none --sizes 16x2048,4x8192,1x32768 --runs 5 --calls 10 \
    --host-calls 0 --time-budget 25 --no-plot --no-progress --out "$scratch/f32" \
    --markdown "$scratch/f32.md")
  echo "=== bench fp32 rc=$? $(date -u +%T)"
  cat "$scratch/f32.md" 2>/dev/null
} 2>&1 | tee "$log"
rm -rf "$scratch"
