#!/usr/bin/env bash
# Installs, on the lent GPU machine, the wheels it lacks, from the part carried in this call.
# The wheels (open_clip, PyAV, scikit-video; DALI in 3 pieces of a tar.xz of its files) are prepared
# on the dev machine under .whl/gpu/p1..p3 (see benchmarks/README.md); carry ONE part per call, in
# order, while the machine stays warm: files under /tmp survive between calls there.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${DEVICE_SITE:-/tmp/site}
PIECES=${DEVICE_PIECES:-/tmp/dali-parts}
mkdir -p "$SITE" "$PIECES"
for part in .whl/gpu/p*; do
  [ -d "$part" ] || continue
  cp "$part"/dali.* "$part"/dali-pieces "$PIECES"/ 2>/dev/null || true  # the count travels with the last piece
  # a warm machine keeps an earlier call's carried part: its wheels are installed once
  stamp="$SITE/.staged-$(basename "$part")-$(ls -l "$part" | md5sum | cut -c1-12)"
  [ -e "$stamp" ] && continue
  ls "$part"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "$part"/*.whl
  touch "$stamp"
done
pieces=$(ls "$PIECES"/dali.[0-9] 2>/dev/null | wc -l || true)  # none yet: 0, not an exit
wanted=$(cat "$PIECES"/dali-pieces 2>/dev/null || echo "?")
if [ "$pieces" = "$wanted" ] && [ ! -e "$SITE"/nvidia/dali ]; then
  cat $(ls "$PIECES"/dali.[0-9] | sort) | python3 -c "
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz') as tar:
    tar.extractall(sys.argv[1], filter='tar')" "$SITE"
fi
echo "staged: $pieces/$wanted DALI pieces; site: $(ls "$SITE" | tr '\n' ' ' | cut -c1-200)"
