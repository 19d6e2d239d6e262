#!/usr/bin/env bash
# Build spear-python's BTP CUDA extension (the SWR paper's kernels) for the benchmark, on the GPU
# machine (Hopper, sm_90a). Nothing of spear is committed: the sdist and the nvidia-cutlass wheel
# (headers only) are downloaded into .peers/ on a machine with a registry (benchmarks/README.md)
# and carried to the GPU machine; the build lands in the git-ignored .peers/build/spear/:
#   src/spear_python-*/   the unpacked sdist (its Python package `spear`)
#   cutlass/              CUTLASS headers from the nvidia-cutlass wheel
#   ext/_btp.so           csrc/btp/_bindings.cu built by torch.utils.cpp_extension.load
#   status                "ok <path of _btp.so>" or "failed: <why>" (the bench waits for it)
# Usage: bash benchmarks/build_spear.sh [PEERS_DIR] (default .peers); about 2 minutes of nvcc.
set -uo pipefail
cd "$(dirname "$0")/.."
PEERS=${1:-${PEERS_DIR:-.peers}}
OUT=${SPEAR_BUILD_DIR:-$PEERS/build/spear}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT/status"

fail() {
  echo "build_spear: $*" >&2
  echo "failed: $*" >"$OUT/status"
  exit 1
}

sdist=$(ls "$PEERS"/spear_python-*.tar.gz 2>/dev/null | head -n 1)
cutlass=$(ls "$PEERS"/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
[ -n "$sdist" ] || fail "no spear_python-*.tar.gz in $PEERS (see benchmarks/README.md)"
[ -n "$cutlass" ] || fail "no nvidia_cutlass-*.whl in $PEERS (see benchmarks/README.md)"
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || fail "nvcc not found"
export PATH=$PATH:/usr/local/cuda/bin

start=$(date +%s)
"$PY" - "$sdist" "$cutlass" "$OUT" <<'EOF' || fail "build error (see the log above)"
import os
import sys
import tarfile
import zipfile

sdist, wheel, out = sys.argv[1:4]
src = os.path.join(out, "src")
inc_root = os.path.join(out, "cutlass")
os.makedirs(src, exist_ok=True)
with tarfile.open(sdist) as t:
    t.extractall(src, filter="data")
top = sorted(d for d in os.listdir(src) if d.startswith("spear_python-"))[-1]
pkg = os.path.join(src, top)
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as z:
    z.extractall(inc_root, [n for n in z.namelist() if n.startswith(prefix)])
include = os.path.join(inc_root, prefix)
assert os.path.exists(os.path.join(include, "cutlass", "cutlass.h")), include

import torch
from torch.utils.cpp_extension import load

cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device capability {cap}", flush=True)
if cap is not None and cap[0] != 9:
    raise SystemExit(f"spear's BTP kernels target Hopper (sm_90a); this device is sm_{cap[0]}{cap[1]}")
build = os.path.join(out, "ext")
os.makedirs(build, exist_ok=True)
mod = load(
    name="_btp",
    sources=[os.path.join(pkg, "csrc", "btp", "_bindings.cu")],
    extra_include_paths=[include, os.path.join(pkg, "csrc", "btp"), os.path.join(pkg, "csrc")],
    extra_cflags=["-O3", "-std=c++17"],
    extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17",
                       "-gencode=arch=compute_90a,code=sm_90a"],
    build_directory=build,
    verbose=True,
)
so = os.path.abspath(mod.__file__)
# the sdist's own package, so that `import spear` finds spear/ops/btp/interface.py
with open(os.path.join(out, "src_dir"), "w") as f:
    f.write(os.path.abspath(pkg) + "\n")
with open(os.path.join(out, "status"), "w") as f:
    f.write(f"ok {so}\n")
print(f"built {so}", flush=True)
EOF
echo "build_spear: done in $(( $(date +%s) - start )) s: $(cat "$OUT/status")"
