"""The package as pip installs it from a wheel (not the editable checkout the tests run on)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module(tmp_path):
    # a copy without build outputs: setuptools would pack a stale build/lib into the wheel
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".whl", "runs", ".benchmarks", "*.so"))
    env = {**os.environ, "VITACLIP_DISABLE_EXT": "1"}  # the Python files are what is checked here
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(source)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("vitaclip-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"vitaclip/{p.relative_to(ROOT / 'vitaclip').as_posix()}" for p in (ROOT / "vitaclip").rglob("*.py")}
    sources |= {f"vitaclip/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert sources - packed == set()
