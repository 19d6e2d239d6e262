#!/usr/bin/env bash
# One command for the GPU machine: environment, GPU tests, compute-sanitizer, demo and benchmark.
#   run with:  bash scripts/gpu_check.sh [quick]     (logs under $OUT, or ./gpu_logs)
# Carry .whl (numpy 2.4 wheel; numba-cuda 0.30 cannot import with the image's numpy 2.5) and,
# for the peers, .peers (see benchmarks/README.md).
set -u
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
source scripts/device_env.sh 2>&1 | tee "$OUT/env.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
step info python3 -m swr_array info
step tests python3 -m pytest -q -x -p no:cacheprovider tests/ --timeout=900
step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitizer_cases.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitizer_cases.py
step demo python3 -m swr_array demo
if [ "${1:-}" != "quick" ] && [ -f scripts/gpu_bench.sh ]; then
  step bench bash scripts/gpu_bench.sh
fi
echo "gpu_check status: $status"
exit $status
