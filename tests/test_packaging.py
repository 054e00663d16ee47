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


def test_the_device_staging_unpacks_dali_once_every_piece_has_come(tmp_path):
    """benchmarks/device_stage.sh, as three device calls run it, each carrying one part of
    .whl/gpu (split_device_wheels.sh's layout): nothing is unpacked until the last piece, which
    brings the count, and then the pieces' tar.xz is unpacked whole, in order, into the site."""
    import io
    import lzma
    import tarfile

    files = {"nvidia/dali/__init__.py": b"version = 1\n", "nvidia/dali/libbig.so": os.urandom(5000)}
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = packed.getvalue()
    assert lzma.decompress(blob)  # a real xz stream, cut in three below
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    env = {**os.environ, "DEVICE_SITE": str(tmp_path / "site"), "DEVICE_PIECES": str(tmp_path / "pieces")}
    for i in range(3):
        call = tmp_path / f"call{i}"  # the working tree of one call: the scripts and one part
        part = call / ".whl" / "gpu" / f"p{i + 1}"
        part.mkdir(parents=True)
        shutil.copytree(ROOT / "benchmarks", call / "benchmarks", ignore=shutil.ignore_patterns("results"))
        (part / f"dali.{i}").write_bytes(blob[cuts[i]:cuts[i + 1]])
        if i == 2:
            (part / "dali-pieces").write_text("3\n")
        result = subprocess.run(["bash", str(call / "benchmarks" / "device_stage.sh")], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"staged: {i + 1}/{3 if i == 2 else '?'} DALI pieces" in result.stdout
        assert (tmp_path / "site" / "nvidia").exists() == (i == 2)
    for name, data in files.items():
        assert (tmp_path / "site" / name).read_bytes() == data
