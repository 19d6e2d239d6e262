#!/usr/bin/env bash
# Decoding at the hardware limit (issue #23), on the GPU machine, within ~110 s:
#   source scripts/device_env.sh && bash scripts/gpu_decode.sh
# 1. scripts/step_plan_sweep.py: the fused middle kernel and swr_step under each launch plan at
#    batch 1, 8, 64, 256, and the small-batch GEMV step (numba_kernels/phalanx_gemv.py) under a
#    few splits at batch 1..16 against the two cuBLAS GEMMs and the GEMM-path step (its kernels
#    compiled first in parallel, into the PTX disk cache the later steps reuse);
# 2. benchmarks/decode_bench.py --runs 5 at batch 1, 8, 64, 256 (graph-captured Phalanx.step
#    and the path it ran, its two GEMMs, its fused middle kernel alone, the host cost of eager
#    Phalanx.step and torch swr_step; no attention rows), JSON + Markdown;
# 3. the step GPU tests (tests/test_gpu_gemv.py, tests/test_gemv_step.py, tests/test_gpu_step.py,
#    tests/test_kernels_step.py);
# 4. scripts/host_profile.py --decode: eager steps' host cost at batch 1 and 64, cProfiles;
# 5. with NCU=1 only: Nsight Compute on the step kernels (swr_step, phalanx_step_mix) alone at
#    batch 1, 64, 256 (every launch: the first of each batch compiles, the second is warm).
# Writes $OUT/decode/log.txt (everything printed: tables, the sweep's SWEEP_JSON line) and
# $OUT/decode/decode_bench.json.
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/decode"
mkdir -p "$dir"
log="$dir/log.txt"
{
  python3 -c "import torch; print('device:', torch.cuda.get_device_name())"
  echo "=== step_plan_sweep $(date -u +%T)"
  timeout 30 python3 scripts/step_plan_sweep.py --batches 1,8,64,256 --gemv-batches 1,2,4,8,16 \
    --runs 5 --calls 50
  echo "=== step_plan_sweep rc=$? $(date -u +%T)"
  timeout 22 python3 benchmarks/decode_bench.py --out "$dir" --batches 1,8,64,256 --contexts "" \
    --runs 5 --calls 20 --host-calls 200
  echo "=== decode_bench rc=$? $(date -u +%T)"
  timeout 45 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu_gemv.py \
    tests/test_gemv_step.py tests/test_gpu_step.py tests/test_kernels_step.py
  echo "=== tests rc=$? $(date -u +%T)"
  timeout 15 python3 scripts/host_profile.py --decode
  echo "=== host_profile rc=$? $(date -u +%T)"
  if [ "${NCU:-0}" = 1 ]; then  # hardware counters of the step kernels alone (adds ~60 s)
    timeout 90 ncu --clock-control none -k regex:step_kernel --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats python3 scripts/decode_step_bench.py --ncu --batches 1,64,256
    echo "=== ncu rc=$? $(date -u +%T)"
  fi
} 2>&1 | tee "$log"
