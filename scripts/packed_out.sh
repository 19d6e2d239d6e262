#!/usr/bin/env bash
# Run a GPU script with its logs packed into ONE file, for machines that send back only a few
# files from $OUT (the device tool returns at most 8, two folders deep):
#   bash scripts/packed_out.sh NAME COMMAND...     e.g.  bash scripts/packed_out.sh check bash scripts/gpu_check.sh tests
# COMMAND runs with OUT set to a scratch folder; that folder is packed into $OUT/NAME.tgz every
# 30 s while it runs and once more when it ends (or is stopped by a time limit: whatever was
# written until the last pack comes back). Exits with COMMAND's status.
set -u
name=${1:?usage: packed_out.sh NAME COMMAND...}
shift
real_out=${OUT:-$PWD/gpu_logs}
mkdir -p "$real_out"
scratch=$(mktemp -d)
pack() {
  tar czf "$real_out/.$name.tgz" -C "$scratch" . 2>/dev/null \
    && mv -f "$real_out/.$name.tgz" "$real_out/$name.tgz"
}
(while sleep 30; do pack; done) &
packer=$!
trap 'kill $packer 2>/dev/null; pack' EXIT
OUT=$scratch "$@"
