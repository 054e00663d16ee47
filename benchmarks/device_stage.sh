#!/usr/bin/env bash
# Installs, on the lent GPU machine, the wheels it lacks, from the part carried in this call.
# The wheels (open_clip, PyAV, scikit-video, DALI split in 4 parts of <64 MiB) are prepared on the
# dev machine under .whl/gpu/p1..p4 (see benchmarks/README.md); carry ONE part per call, in order,
# while the machine stays warm: files under /tmp survive between calls there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/site /tmp/dali-parts
for part in .whl/gpu/p*; do
  [ -d "$part" ] || continue
  cp "$part"/dali.* "$part"/dali-name.txt /tmp/dali-parts/ 2>/dev/null || true  # the name travels with the last piece
  ls "$part"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site "$part"/*.whl
done
pieces=$(ls /tmp/dali-parts/dali.[0-9] 2>/dev/null | wc -l || true)  # none yet: 0, not an exit
if [ "$pieces" = 4 ] && [ -e /tmp/dali-parts/dali-name.txt ] && [ ! -e /tmp/site/nvidia/dali ]; then
  name=$(cat /tmp/dali-parts/dali-name.txt)
  cat /tmp/dali-parts/dali.0 /tmp/dali-parts/dali.1 /tmp/dali-parts/dali.2 /tmp/dali-parts/dali.3 > "/tmp/$name"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "/tmp/$name"
fi
echo "staged: $pieces/4 DALI pieces; site: $(ls /tmp/site | tr '\n' ' ' | cut -c1-200)"
