#!/usr/bin/env bash
# The Phalanx GPU round, on the GPU machine from the repository root, after
# `source scripts/device_env.sh` (project installed, numpy 2.4 carried):
#   bash scripts/gpu_phalanx.sh
# Writes two files into $OUT/phalanx/: phalanx.log (everything below) and phalanx_bench.json.
# Steps, each under a time limit, about 105 s in all (BUDGET):
#   1. scripts/phalanx_dev.py --grid rows: the fused kernels alone at 4x8192, 1x32768 and
#      16x2048, the backward kernels side by side (the walking kernel with 16-, 8- and 4-byte
#      accesses, chunks of 256 and 128 tokens; the block rows), TB/s against the copy
#      bandwidth of the same run;
#   2. ncu of each of those backward variants at 4x8192, one launch each (into the log);
#   3. benchmarks/phalanx_bench.py: the layer against its GEMMs with TUNING as it is
#      (phalanx_bench.json); spear's layer is not built here (its build alone takes ~2 minutes);
#   4. the GPU tests of the layer and of the backward kernels (test_gpu_phalanx.py, the
#      backward and rows tests of test_kernels_phalanx.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${OUT:-$ROOT/gpu_logs}/phalanx
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
exec > >(tee "$DIR/phalanx.log") 2>&1
export PYTHONUNBUFFERED=1
t0=$SECONDS
BUDGET=${BUDGET:-106}
stamp() { echo "[gpu_phalanx +$((SECONDS - t0))s] $*"; }
limit() {  # limit CAP: CAP seconds, or what is left of BUDGET if less (at least 5)
  local left=$((BUDGET - (SECONDS - t0)))
  [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}
status=0
step() {  # step NAME CAP COMMAND...
  local name=$1 cap; cap=$(limit "$2"); shift 2
  stamp "$name (limit ${cap} s): $*"
  (cd /tmp && timeout -k 5 "$cap" "$@")
  local rc=$?
  stamp "$name: exit $rc"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
  --format=csv 2>/dev/null || true

# 1. the fused kernels alone: forward as TUNING has it, the backward kernels side by side
step phalanx_dev 30 python3 "$ROOT/scripts/phalanx_dev.py" --sizes 4x8192,1x32768,16x2048 \
  --grid rows

# 2. where the backward kernels' time goes (ncu, when installed): one launch of each
if command -v ncu >/dev/null 2>&1; then
  step ncu 22 ncu --clock-control none -k regex:phalanx_mix_backward --launch-count 6 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats \
    python3 "$ROOT/scripts/phalanx_dev.py" --sizes 4x8192 --profile --grid rows
else
  stamp "no ncu: step 2 skipped"
fi

# 3. the layer against its GEMMs, TUNING as it is
step phalanx_bench 10 python3 "$ROOT/benchmarks/phalanx_bench.py" --out "$DIR" --runs 10 \
  --no-decode

# 4. tests of the layer and of the backward kernels
step tests 40 python3 -m pytest -q -p no:cacheprovider -n 12 "$ROOT/tests/test_gpu_phalanx.py" \
  "$ROOT/tests/test_kernels_phalanx.py" -k "backward or dim_2048 or vjp"

stamp "done (status $status); files in $DIR:"
ls -la "$DIR"
exit "$status"
