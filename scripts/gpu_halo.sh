#!/usr/bin/env bash
# The halo walks of hops 2..8 (issue #19), on the GPU machine, within ~90 s:
#   source scripts/device_env.sh && bash scripts/gpu_halo.sh
# 1. tests/test_halo_walk.py's GPU cases (the front's swr and swr_vjp through the halo walks,
#    poisoned outputs, bf16 hops 2/4 both layouts, float32 per channel hops 3), one process
#    each, while 19 more processes compile what the sweep times (halo_sweep.PRECOMPILE):
#    kernels compile in parallel into the PTX cache that the sweep then reads;
# 2. scripts/halo_sweep.py: forward, backward and forward+backward of hops 2 and 4 at 16x2048,
#    4x8192 and 1x32768 bf16, both layouts, against the memory floor, per chunk length; then
#    the variants at 4x8192 (BLHD backward access bytes and unroll, BHDL group bytes).
# Writes $OUT/halo/log.txt (everything printed) and $OUT/halo/sweep.json.
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/halo"
mkdir -p "$dir"
log="$dir/log.txt"
{
  echo "=== tests $(date -u +%T)"
  pids=()
  for i in $(seq 0 18); do
    timeout 45 python3 scripts/halo_sweep.py --precompile "$i" >"$dir/.pre$i" 2>&1 &
    pids+=($!)
  done
  timeout 45 python3 -m pytest -q -p no:cacheprovider -n 6 -m gpu tests/test_halo_walk.py
  echo "=== tests rc=$? $(date -u +%T)"
  for p in "${pids[@]}"; do wait "$p"; done
  for i in $(seq 0 18); do tail -n 3 "$dir/.pre$i"; rm -f "$dir/.pre$i"; done
  echo "=== precompiled $(date -u +%T)"
  timeout 40 python3 scripts/halo_sweep.py --json "$dir/sweep.json"
  echo "=== halo_sweep rc=$? $(date -u +%T)"
} 2>&1 | tee "$log"
