#!/usr/bin/env bash
# The Phalanx GPU round, on the GPU machine from the repository root, after
# `source scripts/device_env.sh` (project installed, numpy 2.4 carried); carry .peers for spear:
#   bash scripts/gpu_phalanx.sh
# Writes two files into $OUT/phalanx/: phalanx.log (everything below) and hybrid_bench.json.
# Steps, each under a time limit, about 290 s in all (BUDGET):
#   0. spear's BTP extension built in the background (benchmarks/build_spear.sh), unless built;
#   1. benchmarks/hybrid_bench.py: 12-layer decoder LMs x dim 2048, bf16, 32K tokens per step at
#      4K..32K context (transformer, 1:1 and 1:3 hybrids, all Phalanx, the 1:3 hybrid with
#      spear's layer last when its build is ready);
#   2. scripts/phalanx_dev.py --grid promising: the fused kernels alone over launch variants, TB/s
#      against the copy bandwidth of the same run;
#   3. benchmarks/phalanx_bench.py: the layer against its GEMMs (and spear's layer), no decode;
#   4. the Phalanx GPU and kernel tests (test_gpu_phalanx.py, test_kernels_phalanx.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${OUT:-$ROOT/gpu_logs}/phalanx
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
exec > >(tee "$DIR/phalanx.log") 2>&1
export PYTHONUNBUFFERED=1
t0=$SECONDS
BUDGET=${BUDGET:-292}
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

# 0. spear (optional): about 2 minutes of nvcc beside the hybrid benchmark
SPEAR_DIR=$ROOT/.peers/build/spear
spear_pid=
if [ -f "$SPEAR_DIR/status" ] && grep -q '^ok' "$SPEAR_DIR/status"; then
  stamp "spear already built: $(cat "$SPEAR_DIR/status")"
elif [ -d "$ROOT/.peers" ]; then
  bash benchmarks/build_spear.sh .peers >/tmp/spear_build.log 2>&1 &
  spear_pid=$!
  stamp "building spear in the background (pid $spear_pid, log /tmp/spear_build.log)"
else
  stamp "no .peers: spear's rows will be skipped"
fi

# 1. the hybrid models (Part A of issue #20)
step hybrid_bench 115 python3 "$ROOT/benchmarks/hybrid_bench.py" --out "$DIR" --layers 12 \
  --contexts 32768,4096,16384,8192 --time-budget 100 --spear-build "$SPEAR_DIR" --spear-wait 15

# 2. the fused kernels alone over launch variants
step phalanx_dev 80 python3 "$ROOT/scripts/phalanx_dev.py" --sizes 4x8192,1x32768 \
  --grid promising

# 3. the layer against its GEMMs (spear's layer too if its build is ready by now)
step phalanx_bench 35 python3 "$ROOT/benchmarks/phalanx_bench.py" --out /tmp/phalanx_bench \
  --runs 10 --no-decode --spear-build "$SPEAR_DIR" --spear-wait 0

# 4. tests
step tests 60 python3 -m pytest -q -p no:cacheprovider -n 8 -x "$ROOT/tests/test_gpu_phalanx.py" \
  "$ROOT/tests/test_kernels_phalanx.py"

if [ -n "$spear_pid" ]; then
  if kill -0 "$spear_pid" 2>/dev/null; then
    stamp "spear build still running: stopping it"
    kill "$spear_pid" 2>/dev/null || true
  fi
  stamp "spear build log (tail):"
  tail -n 5 /tmp/spear_build.log
fi
stamp "done (status $status); files in $DIR:"
ls -la "$DIR"
exit "$status"
