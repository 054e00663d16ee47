#!/usr/bin/env bash
# Regroups the wheels of ../shared/tools/device-wheels.sh --dali into four parts of under 64 MiB
# each (.whl/gpu/p1..p4), one per device call: p1 = open_clip, ftfy, wcwidth, PyAV, scikit-video
# + 22 MiB of DALI (all the first call's stages need, the loader benchmark's PyAV part included);
# p2 = DALI's dependencies + 55 MiB; p3 = 57 MiB; p4 = the rest.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)/.whl"
whl=/tmp/vitaclip-dali.whl
cat dali-[0-9]/dali-part.* > "$whl"
rm -rf gpu && mkdir -p gpu/p1 gpu/p2 gpu/p3 gpu/p4
MiB=1048576
dd if="$whl" of=gpu/p1/dali.0 bs=$MiB count=22 status=none
dd if="$whl" of=gpu/p2/dali.1 bs=$MiB skip=22 count=55 status=none
dd if="$whl" of=gpu/p3/dali.2 bs=$MiB skip=77 count=57 status=none
dd if="$whl" of=gpu/p4/dali.3 bs=$MiB skip=134 status=none
cp base/*.whl gpu/p1/
cp dali-deps/*.whl gpu/p2/
cp dali-name.txt gpu/p4/dali-name.txt  # with the last piece: the call that assembles the wheel has it
rm -f "$whl"
du -sm gpu/*
