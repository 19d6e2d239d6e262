#!/usr/bin/env bash
# The rest of issue #3's targets on the GPU machine, beside scripts/gpu_bench.sh (which times the
# headline bf16 cases against the peers): float32, per-channel coefficients, hops 0 and the block
# lengths, ours only (`--peers none`), each into $OUT/<name>/bench.json and a log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench_results}
mkdir -p "$OUT"
# shellcheck disable=SC1091
source scripts/device_env.sh >"$OUT/targets_env.log" 2>&1 || exit 1
run() {  # run NAME OPTIONS...
  local name=$1; shift
  (cd /tmp && timeout 150 python3 -m swr_array bench --peers none --host-calls 0 --no-plot \
    --no-progress --out "$OUT/$name" "$@") >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $?"; grep -E "^\||^\*\*" "$OUT/$name.log"
}
run fp32 --dtypes fp32
run per_channel --per-channel
run hops_block_len --hops 0,1 --block-len 8,16,32,64
