#!/usr/bin/env bash
# The benchmark, in one command on the GPU machine (from the repository root):
#   bash scripts/gpu_bench.sh [extra options of `python -m swr_array bench`]
# with `.whl` and `.peers` carried (see benchmarks/README.md). It installs the project and the
# carried peer wheels, builds spear's BTP extension in the background (benchmarks/build_spear.sh),
# and runs `python -m swr_array bench --markdown`, everything written to $OUT (default
# bench_results/): bench.json, bench.png, benchmarks.md, benchmarks.png, gpu_bench.log,
# spear_build.log; then benchmarks/phalanx_bench.py (with spear's layer): phalanx_bench.{json,log,
# md}. Every peer is optional: one that fails to install, build or run is skipped with its reason
# in the log and the page. Runs in about 7 minutes (BENCH_BUDGET, BENCH_TIMEOUT, PHALANX=0 skips
# the layer).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_bench.log") 2>&1
t0=$(date +%s)
stamp() { echo "[gpu_bench +$(( $(date +%s) - t0 ))s] $*"; }

# 1. the project (numpy<2.5 wheel from .whl/, see scripts/device_env.sh), reinstalled when a
#    warm machine holds an older copy
fresh=0
[ -f /tmp/site/.swr_ready ] || fresh=1
# shellcheck disable=SC1091
source scripts/device_env.sh || { stamp "device_env.sh failed"; exit 1; }
if [ "$fresh" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target /tmp/site . >/dev/null || stamp "reinstalling the project failed"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
  --format=csv 2>/dev/null || true

# 2. peers carried as wheels in .peers/ (no registry on this machine)
PEER_SITE=/tmp/peers_site
mkdir -p "$PEER_SITE"
for whl in .peers/accelerated_scan-*.whl .peers/fla_core-*.whl; do
  if [ -f "$whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$PEER_SITE" \
      "$whl" || stamp "installing $whl failed: that peer will be skipped"
  else
    stamp "no $whl: that peer will be skipped (benchmarks/README.md says how to fetch it)"
  fi
done
export PYTHONPATH=$PYTHONPATH:$PEER_SITE

# 3. spear's extension, built beside the benchmark (about 2 minutes of nvcc on one core)
SPEAR_DIR=$ROOT/.peers/build/spear
spear_pid=
if [ -f "$SPEAR_DIR/status" ] && grep -q '^ok' "$SPEAR_DIR/status"; then
  stamp "spear already built: $(cat "$SPEAR_DIR/status")"
else
  bash benchmarks/build_spear.sh .peers >"$OUT/spear_build.log" 2>&1 &
  spear_pid=$!
  stamp "building spear in the background (pid $spear_pid, log spear_build.log)"
fi

# 4. the benchmark, from a scratch folder (the repo root would shadow the installed package)
BENCH=(python3 -m swr_array bench)
if ! (cd /tmp && python3 -m swr_array bench --help >/dev/null 2>&1); then
  BENCH=(python3 -m swr_array.bench)  # until the CLI wires the subcommand
fi
stamp "running ${BENCH[*]}"
(cd /tmp && timeout -k 10 "${BENCH_TIMEOUT:-300}" "${BENCH[@]}" \
  --out "$OUT" --markdown "$OUT/benchmarks.md" \
  --spear-build "$SPEAR_DIR" --spear-wait 240 \
  --time-budget "${BENCH_BUDGET:-250}" "$@")
rc=$?
[ "$rc" = 124 ] && stamp "the benchmark hit its ${BENCH_TIMEOUT:-300} s limit: partial bench.json"

# 5. the Phalanx layer (ours vs its GEMMs and spear's layer, same process), unless PHALANX=0
if [ "${PHALANX:-1}" != 0 ]; then
  stamp "running benchmarks/phalanx_bench.py"
  (cd /tmp && timeout -k 10 "${PHALANX_TIMEOUT:-240}" python3 "$ROOT/benchmarks/phalanx_bench.py" \
    --out "$OUT" --spear-build "$SPEAR_DIR" --spear-wait 120 >"$OUT/phalanx_bench.log" 2>&1)
  stamp "phalanx_bench exit $?"
  sed -n '/^| B x L/,$p' "$OUT/phalanx_bench.log" >"$OUT/phalanx_bench.md"
  cat "$OUT/phalanx_bench.md"
fi

if [ -n "$spear_pid" ] && kill -0 "$spear_pid" 2>/dev/null; then
  stamp "spear build still running: stopping it"
  kill "$spear_pid" 2>/dev/null || true
fi
stamp "done (exit $rc); files in $OUT:"
ls -la "$OUT"
exit "$rc"
