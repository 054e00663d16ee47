"""benchmarks/gpu_check.sh's set-up on a warm machine, with python3 and nvidia-smi stubbed: the
extension is built again when its sources changed since the call that built it (a warm machine keeps
the earlier call's library, and its marker of a failed build)."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PYTHON3 = """#!/bin/bash
echo "$*" >> "$CALLS"
case "$*" in
  *"pip install"*)
    [[ "$*" == *"-e ."* && -z "$VITACLIP_DISABLE_EXT" && -e "$FAIL_BUILD" ]] && exit 1
    [ -z "$VITACLIP_DISABLE_EXT" ] && echo built > vitaclip/_C.cpython-312-x86_64-linux-gnu.so
    exit 0 ;;
  *"import vitaclip, vitaclip._C"*) ls vitaclip/_C.*.so > /dev/null 2>&1 ;;
  *) exit 0 ;;
esac
"""


@pytest.fixture
def machine(tmp_path):
    tree = tmp_path / "tree"
    for part in ("benchmarks/gpu_check.sh", "benchmarks/device_stage.sh", "setup.py"):
        (tree / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, tree / part)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / "vitaclip").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", PYTHON3), ("nvidia-smi", "#!/bin/bash\necho stub GPU\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               OUT=str(tmp_path / "out"), GPU_CHECK_STATE=str(tmp_path / "state"), FAIL_BUILD=str(tmp_path / "fail"),
               DEVICE_SITE=str(tmp_path / "site"), DEVICE_PIECES=str(tmp_path / "pieces"))
    (tmp_path / "state").mkdir()

    def call() -> int:
        """One gpu_check.sh call with no stage (the set-up alone): the builds it made (pip installs)."""
        calls = tmp_path / "calls"
        calls.write_text("")
        subprocess.run(["bash", "benchmarks/gpu_check.sh", "none"], cwd=tree, env=env, check=True,
                       capture_output=True, timeout=60)
        return sum("pip install" in line and "-e ." in line for line in calls.read_text().splitlines())

    return tree, tmp_path / "fail", call


def test_a_warm_machine_builds_again_after_the_sources_change(machine):
    tree, _, call = machine
    assert call() == 1  # a fresh machine builds
    assert call() == 0  # the same sources: the library is there
    with open(tree / "csrc" / "summary_attention.h", "a") as f:
        f.write("// a fix between two calls\n")
    assert call() == 1  # the library left by the first call is of the old sources
    assert call() == 0


def test_a_failed_build_is_retried_only_for_other_sources(machine):
    tree, fail, call = machine
    fail.touch()
    assert call() == 2  # the build, then the install without the extension
    assert call() == 0  # not retried for the same sources
    fail.unlink()
    with open(tree / "csrc" / "summary_attention.h", "a") as f:
        f.write("// the fix\n")
    assert call() == 1


def test_a_carried_part_left_on_a_warm_machine_is_installed_once(machine):
    """A part carried by an earlier call stays in the tree there: its wheels are not installed again at
    every call (the DALI parts come one per call), but a part with other wheels is."""
    tree, _, call = machine
    part = tree / ".whl" / "gpu" / "p1"
    part.mkdir(parents=True)
    (part / "open_clip_torch-3.0-py3-none-any.whl").write_text("a wheel")

    def wheel_installs() -> int:
        call()
        calls = (tree.parent / "calls").read_text().splitlines()
        return sum("pip install" in line and "--target" in line for line in calls)

    assert wheel_installs() == 1
    assert wheel_installs() == 0
    (part / "av-16.0-cp312-cp312-linux_x86_64.whl").write_text("another wheel")
    assert wheel_installs() == 1
