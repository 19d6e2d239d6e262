set -u
t0=$SECONDS
source scripts/device_env.sh > $OUT/env.log 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . > /dev/null 2>&1
for i in 1 2; do
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_gpu_torch.py > $OUT/torch_tests_$i.log 2>&1; echo "torch tests $i rc=$? $((SECONDS-t0))s"; tail -2 $OUT/torch_tests_$i.log
done
OUT=$OUT/bench BENCH_TIMEOUT=330 bash scripts/gpu_bench.sh > /dev/null 2>&1; echo "bench rc=$? $((SECONDS-t0))s"
tail -40 $OUT/bench/gpu_bench.log
