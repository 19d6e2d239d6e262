#!/usr/bin/env bash
# Native packed kernels (issue #18), on the GPU machine, within ~90 s:
#   source scripts/device_env.sh && bash scripts/gpu_packed.sh
# 0. scripts/packed_warm.py: the kernels below compiled in parallel processes (PTX disk cache);
# 1. scripts/packed_profile.py: each direction of the public call (events and host time per
#    call) and each kernel alone (CUDA graph replay), dense and packed, both layouts;
# 2. benchmarks/packed_bench.py at 32768 tokens, 128 heads x 16 (2048 channels), bfloat16,
#    block_len 16, hops 1, both layouts, 16 and 1000 documents, the dense call in the same run;
# 3. a subset of the packed GPU tests of the native kernels that fits the time left
#    (tests/test_gpu_packed.py: the poisoned cases of both layouts and kernel families, the
#    invalid-cu case); the whole file is `python3 -m pytest -m gpu tests/test_gpu_packed.py`.
# Writes $OUT/packed/log.txt (everything printed, the Markdown table last) and
# $OUT/packed/packed_bench.json.
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/packed"
mkdir -p "$dir"
log="$dir/log.txt"
{
  echo "=== warm $(date -u +%T)"
  timeout 15 python3 scripts/packed_warm.py --jobs 12
  echo "=== warm rc=$? $(date -u +%T)"
  echo "=== profile $(date -u +%T)"
  timeout 15 python3 scripts/packed_profile.py --reps 10 --sweep
  echo "=== profile rc=$? $(date -u +%T)"
  timeout 20 python3 benchmarks/packed_bench.py --out "$dir" --runs 5 --calls 3 --warmup 2
  echo "=== bench rc=$? $(date -u +%T)"
  echo "=== tests $(date -u +%T)"
  timeout 38 python3 -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_gpu_packed.py \
    -k "bad_device or (poisoned and bf16 and rblocks) or (bhdl_poisoned and 1-True) or headline or no_sync"
  echo "=== tests rc=$? $(date -u +%T)"
} 2>&1 | tee "$log"
