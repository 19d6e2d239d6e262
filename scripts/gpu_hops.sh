#!/usr/bin/env bash
# Every recurrence mode against the memory floor (issue #19), on the GPU machine, within ~200 s:
#   source scripts/device_env.sh && bash scripts/gpu_hops.sh
# 1. the forward kernels' GPU tests (tests/test_gpu_forward.py: the halo walk for BLHD hops 2..8
#    included; the halo and fused simulator cases of tests/test_kernels_forward.py, on the GPU;
#    tests/test_gpu_front.py's forward/backward/state case, hops 2 and 5 through the front);
# 2. `python -m swr_array bench --peers none --dtypes bf16 --hops 0,1,2,4,none` at 16x2048,
#    4x8192 and 1x32768, both layouts, forward and forward+backward, ratios to the floor;
# 3. scripts/hops_sweep.py: the halo walk's forward per chunk length (run before 2, ~30 s).
# Writes $OUT/hops/log.txt (everything printed, the Markdown tables included) and
# $OUT/hops/bench.json.
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/hops"
mkdir -p "$dir"
log="$dir/log.txt"
scratch=$(mktemp -d)
{
  echo "=== tests $(date -u +%T)"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_gpu_forward.py tests/test_kernels_forward.py tests/test_gpu_front.py \
    -k "halo or 4x8192 or forward_backward_state or fused_matches"
  echo "=== tests rc=$? $(date -u +%T)"
  timeout 30 python3 scripts/hops_sweep.py
  echo "=== hops_sweep rc=$? $(date -u +%T)"
  # from a scratch folder: bench writes bench.json there, then only that file is kept
  (cd "$scratch" && timeout 110 python3 -m swr_array bench --peers none --dtypes bf16 \
    --hops 0,1,2,4,none --sizes 16x2048,4x8192,1x32768 --runs 5 --calls 10 --host-calls 0 \
    --time-budget 100 --no-plot --no-progress --out "$scratch" --markdown "$scratch/hops.md")
  echo "=== bench rc=$? $(date -u +%T)"
  cat "$scratch/hops.md" 2>/dev/null
  cp "$scratch/bench.json" "$dir/bench.json" 2>/dev/null
} 2>&1 | tee "$log"
rm -rf "$scratch"
