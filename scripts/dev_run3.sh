set -u
t0=$SECONDS
OUT=$OUT/check bash scripts/gpu_check.sh tests > /dev/null 2>&1; echo "gpu_check tests rc=$? $((SECONDS-t0))s"; tail -4 $OUT/check/tests.log
source scripts/device_env.sh > /dev/null 2>&1
timeout 60 python3 -m swr_array demo > $OUT/demo.log 2>&1; echo "demo rc=$?"; tail -3 $OUT/demo.log
timeout 120 python3 scripts/host_profile.py > $OUT/profile.log 2>&1; echo "profile rc=$?"; head -12 $OUT/profile.log
timeout 120 python3 benchmarks/adapters_bench.py > $OUT/adapters.log 2>&1; grep "|" $OUT/adapters.log
echo total $((SECONDS-t0))
