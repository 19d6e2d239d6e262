# Source this first in every command on the GPU machine (see docs/development.md).
# The image has numpy 2.5, which numba-cuda 0.30 cannot import (numpy.row_stack was removed);
# we carry a numpy 2.4 wheel in .whl/ and install it with the project into /tmp/site.
set -e
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ ! -f /tmp/site/.swr_ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . >/dev/null
  touch /tmp/site/.swr_ready
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import numpy, numba_cuda, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__)"
set +e
