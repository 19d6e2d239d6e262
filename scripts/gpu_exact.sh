#!/usr/bin/env bash
# The one-pass exact scan (hops=None, issue #19), on the GPU machine, within ~110 s:
#   source scripts/device_env.sh && bash scripts/gpu_exact.sh
# 1. its GPU tests (tests/test_kernels_exact.py: the kernels against the reference with poisoned
#    outputs, repeated launches on one workspace and a CUDA-graph replay; the front's hops=None
#    forward cases of tests/test_kernels_front.py);
# 2. scripts/exact_sweep.py: forward and gradient per tile shape and look-back (22 s);
# 3. `python -m swr_array bench --hops none` per head, bf16 and fp32, 16x2048, 4x8192, 1x32768,
#    both layouts, forward and forward+backward against the floor;
# 4. the same per channel in bf16 with the peers accelerated-scan and chunk_hgrn (installed from
#    .peers/ when carried, as scripts/gpu_bench.sh does), then 1x262144 and 1x1048576 if time is
#    left.
# Writes $OUT/exact/log.txt (everything printed, the Markdown tables included) and
# $OUT/exact/bench.json (the bench runs' JSON, one object per run).
set -u
export PYTHONUNBUFFERED=1
dir="${OUT:-$PWD/gpu_logs}/exact"
mkdir -p "$dir"
log="$dir/log.txt"
scratch=$(mktemp -d)
root=$PWD
t0=$(date +%s)
left() { echo $(( 105 - ($(date +%s) - t0) )); }
{
  echo "=== tests $(date -u +%T)"
  timeout 40 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_kernels_exact.py \
    tests/test_kernels_front.py -k "gpu or front_exact or (forward_and_state and None)"
  echo "=== tests rc=$? $(date -u +%T)"
  timeout 26 python3 scripts/exact_sweep.py 22
  echo "=== exact_sweep rc=$? $(date -u +%T)"
  peer_site=/tmp/peers_site
  mkdir -p "$peer_site"
  for whl in "$root"/.peers/accelerated_scan-*.whl "$root"/.peers/fla_core-*.whl; do
    [ -f "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target "$peer_site" "$whl" >/dev/null 2>&1
  done
  export PYTHONPATH=$PYTHONPATH:$peer_site
  common=(--hops none --runs 5 --calls 10 --host-calls 0 --no-plot --no-progress)
  b=$(left); b=$(( b - 20 < 18 ? b - 20 : 18 )); [ "$b" -lt 10 ] && b=10
  (cd "$scratch" && mkdir -p head && timeout "$b" python3 -m swr_array bench "${common[@]}" \
    --peers none --dtypes bf16,fp32 --sizes 16x2048,4x8192,1x32768 --time-budget $((b - 4)) \
    --out "$scratch/head" --markdown "$scratch/head/t.md")
  echo "=== bench per head rc=$? $(date -u +%T)"
  cat "$scratch/head/t.md" 2>/dev/null
  b=$(left); b=$(( b - 2 < 18 ? b - 2 : 18 )); [ "$b" -lt 10 ] && b=10
  (cd "$scratch" && mkdir -p chan && timeout "$b" python3 -m swr_array bench "${common[@]}" \
    --per-channel --peers accelerated-scan,chunk_hgrn --dtypes bf16 \
    --sizes 16x2048,4x8192,1x32768 --time-budget $((b - 4)) \
    --out "$scratch/chan" --markdown "$scratch/chan/t.md")
  echo "=== bench per channel + peers rc=$? $(date -u +%T)"
  cat "$scratch/chan/t.md" 2>/dev/null
  b=$(left)
  if [ "$b" -gt 8 ]; then
    (cd "$scratch" && mkdir -p long && timeout "$b" python3 -m swr_array bench "${common[@]}" \
      --peers none --dtypes bf16 --layouts BLHD,BHDL --sizes 1x262144,1x1048576 \
      --time-budget $((b - 3)) --out "$scratch/long" --markdown "$scratch/long/t.md")
    echo "=== bench long rc=$? $(date -u +%T)"
    cat "$scratch/long/t.md" 2>/dev/null
  fi
  python3 - "$scratch" "$dir/bench.json" <<'PY'
import json, os, sys
runs = {}
for name in ("head", "chan", "long"):
    path = os.path.join(sys.argv[1], name, "bench.json")
    if os.path.exists(path):
        with open(path) as f:
            runs[name] = json.load(f)
with open(sys.argv[2], "w") as f:
    json.dump(runs, f)
print("bench.json:", sorted(runs))
PY
  echo "=== done $(date -u +%T) ($(( $(date +%s) - t0 )) s)"
} 2>&1 | tee "$log"
rm -rf "$scratch"
