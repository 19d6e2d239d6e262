#!/usr/bin/env bash
# The GPU machine's check: environment, GPU tests, compute-sanitizer, demo (and benchmark).
#   bash scripts/gpu_check.sh tests    # info + every GPU and kernel test (pytest-xdist)
#   bash scripts/gpu_check.sh tools    # compute-sanitizer memcheck/racecheck + demo
#   bash scripts/gpu_check.sh all      # both, then scripts/gpu_bench.sh
# Logs go to $OUT (or ./gpu_logs). Carry .whl (numpy 2.4: numba-cuda 0.30 cannot import with
# the image's numpy 2.5) and, for the benchmark's peers, .peers (see benchmarks/README.md).
set -u
mode="${1:-all}"
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
source scripts/device_env.sh >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 30 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  step info 60 python3 -m swr_array info
  step tests "${TEST_LIMIT:-480}" python3 -m pytest -q -p no:cacheprovider -n 12 \
    tests/test_kernels_*.py tests/test_gpu_*.py tests/test_errors.py tests/test_generate.py
fi
if [ "$mode" = tools ] || [ "$mode" = all ]; then
  step memcheck 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 scripts/sanitizer_cases.py
  step racecheck 200 compute-sanitizer --tool racecheck --error-exitcode 9 \
    python3 scripts/sanitizer_cases.py --quick
  step demo 120 python3 -m swr_array demo
fi
if [ "$mode" = all ]; then
  step bench 420 bash scripts/gpu_bench.sh
fi
echo "gpu_check status: $status"
exit $status
