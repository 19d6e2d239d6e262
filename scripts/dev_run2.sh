set -u
source scripts/device_env.sh > $OUT/env.log 2>&1 || { cat $OUT/env.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv
t0=$SECONDS
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_gpu_front.py tests/test_gpu_torch.py tests/test_gpu_jax.py > $OUT/tests.log 2>&1; echo "tests rc=$? $((SECONDS-t0))s"; tail -8 $OUT/tests.log
timeout 120 python3 scripts/host_profile.py > $OUT/profile.log 2>&1; echo "profile rc=$?"; head -12 $OUT/profile.log
timeout 120 python3 benchmarks/adapters_bench.py > $OUT/adapters.log 2>&1; grep "|" $OUT/adapters.log
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 tests/test_gpu_jax.py > $OUT/jax_bench.log 2>&1; tail -4 $OUT/jax_bench.log
echo total $((SECONDS-t0))
