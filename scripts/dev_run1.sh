set -u
source scripts/device_env.sh > $OUT/env.log 2>&1 || { cat $OUT/env.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv
t0=$SECONDS
timeout 420 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_gpu_front.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_jax.py tests/test_kernels_backward.py > $OUT/tests.log 2>&1; echo "tests rc=$? $((SECONDS-t0))s"; tail -15 $OUT/tests.log
timeout 120 python3 scripts/host_profile.py > $OUT/profile.log 2>&1; echo "profile rc=$?"; head -12 $OUT/profile.log
timeout 120 python3 benchmarks/adapters_bench.py > $OUT/adapters.log 2>&1; cat $OUT/adapters.log | tail -12
echo total $((SECONDS-t0))
