#!/usr/bin/env bash
# Decoding at the hardware limit (issue #23), on the GPU machine, within ~150 s:
#   source scripts/device_env.sh && bash scripts/gpu_decode.sh
# 1. the step kernels' GPU tests (tests/test_gpu_step.py, tests/test_kernels_step.py);
# 2. benchmarks/decode_bench.py --runs 7 at batch 1, 64, 256 (graph-captured Phalanx.step, its
#    two GEMMs, its fused middle kernel alone, the host cost of eager Phalanx.step and torch
#    swr_step; no attention rows), JSON + Markdown;
# 3. scripts/decode_step_bench.py: the CuPy front's steps (host and GPU microseconds);
# 4. scripts/host_profile.py --decode: eager steps' host cost at batch 1 and a cProfile;
# 5. with NCU=1 only: Nsight Compute on the step kernels (swr_step, phalanx_step_mix) alone at
#    batch 1, 64, 256 (every launch: the first of each batch compiles, the second is warm).
# Writes $OUT/decode/log.txt (everything printed, the Markdown table included) and
# $OUT/decode/decode_bench.json.
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/decode"
mkdir -p "$dir"
log="$dir/log.txt"
{
  python3 -c "import torch; print('device:', torch.cuda.get_device_name())"
  echo "=== tests $(date -u +%T)"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_gpu_step.py tests/test_kernels_step.py
  echo "=== tests rc=$? $(date -u +%T)"
  timeout 50 python3 benchmarks/decode_bench.py --out "$dir" --batches 1,64,256 --contexts "" \
    --runs 7 --calls 20 --host-calls 300
  echo "=== decode_bench rc=$? $(date -u +%T)"
  timeout 20 python3 scripts/decode_step_bench.py --batches 1,64,256 --steps 200
  echo "=== decode_step_bench rc=$? $(date -u +%T)"
  timeout 15 python3 scripts/host_profile.py --decode
  echo "=== host_profile rc=$? $(date -u +%T)"
  if [ "${NCU:-0}" = 1 ]; then  # hardware counters of the step kernels alone (adds ~60 s)
    timeout 90 ncu --clock-control none -k regex:step_kernel --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats python3 scripts/decode_step_bench.py --ncu --batches 1,64,256
    echo "=== ncu rc=$? $(date -u +%T)"
  fi
} 2>&1 | tee "$log"
