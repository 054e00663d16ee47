#!/usr/bin/env bash
# Regroups the wheels of ../shared/tools/device-wheels.sh --dali into three parts of under 64 MiB
# each (.whl/gpu/p1..p3), one per device call: p1 = open_clip, ftfy, wcwidth, PyAV, scikit-video +
# the first piece of DALI (all the first call's stages need, the loader benchmark's PyAV part
# included); p2 = the second piece; p3 = the last, DALI's dependencies and the piece count.
# DALI travels as its wheel's files for the device's CPython only (the wheel holds the extension
# modules of eight versions), without its C++ headers and type stubs, in one tar.xz: 127 MiB
# against the wheel's 189 (four calls before). DEVICE_PYTHON picks another CPython (e.g. 311 to
# try the staging here).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)/.whl"
python=${DEVICE_PYTHON:-312}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat dali-[0-9]/dali-part.* > "$work/dali.whl"
python3 - "$work/dali.whl" "$work/tree" "$python" <<'PY'
import re, sys, zipfile
wheel, tree, python = sys.argv[1:]
other_python = re.compile(rf"\.cpython-3(?!{python[1:]}-)\d+t?-x86_64-linux-gnu\.so$")
not_needed = re.compile(r"^nvidia/dali/include/|\.pyi$")
with zipfile.ZipFile(wheel) as z:
    z.extractall(tree, [n for n in z.namelist() if not (other_python.search(n) or not_needed.search(n))])
PY
tar -C "$work/tree" -cf - . | xz -9e -T2 > "$work/dali.tar.xz"
rm -rf gpu && mkdir -p gpu/p1 gpu/p2 gpu/p3
MiB=1048576
part=60  # MiB a call carries of wheels: the rest of its 64 is for the working tree
base=$(( ($(du -cb base/*.whl | tail -1 | cut -f1) + MiB - 1) / MiB ))
first=$(( part - base ))
dd if="$work/dali.tar.xz" of=gpu/p1/dali.0 bs=$MiB count=$first status=none
dd if="$work/dali.tar.xz" of=gpu/p2/dali.1 bs=$MiB skip=$first count=$part status=none
dd if="$work/dali.tar.xz" of=gpu/p3/dali.2 bs=$MiB skip=$(( first + part )) status=none
cp base/*.whl gpu/p1/
cp dali-deps/*.whl gpu/p3/
echo 3 > gpu/p3/dali-pieces  # with the last piece: the call that assembles DALI has it
du -sm gpu/*
for p in gpu/p*; do
  [ "$(du -sm "$p" | cut -f1)" -le 62 ] || { echo "$p is over 62 MiB: too much for one call" >&2; exit 1; }
done
