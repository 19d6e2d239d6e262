# Source this first in every command on the GPU machine (see docs/development.md).
# The image has numpy 2.5, which numba-cuda 0.30 cannot import (numpy.row_stack was removed);
# we carry a numpy 2.4 wheel in .whl/ and install it with the project into /tmp/site.
set -e
# PYTHONSAFEPATH: `python -m ...` from the repo root must import the installed package (with its
# mapped swr_array.numba_kernels), not the source folder ./swr_array.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONSAFEPATH=1
if [ ! -f /tmp/site/.numpy_ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.numpy_ready
fi
# the project itself is reinstalled every call: the working tree changes between calls
rm -rf /tmp/site/swr_array /tmp/site/swr_array-*.dist-info
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import numpy, numba_cuda, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__)"
set +e
