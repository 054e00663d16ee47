"""The package as pip installs it from a wheel (not the editable checkout the tests run on), what its
build takes, and the versions its tests can run with."""
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


def fake_toolkit(root: Path, version_output: str) -> str:
    """A folder with what setup.py looks for in a CUDA toolkit: bin/nvcc (printing `version_output`
    for --version) and lib64/libcudart.so."""
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '{version_output}'\n")
    nvcc.chmod(0o755)
    return str(root)


def setup_functions(monkeypatch):
    """setup.py's globals, run without building anything."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("VITACLIP_DISABLE_EXT", "1")  # the module-level extension_build() call: nothing
    functions = runpy.run_path(str(ROOT / "setup.py"))
    monkeypatch.delenv("VITACLIP_DISABLE_EXT")
    return functions


def test_the_build_takes_a_cuda_toolkit_of_torchs_major_version(tmp_path, monkeypatch, capsys):
    """torch refuses to build a CUDA extension with a toolkit of another major version ('The detected
    CUDA version (13.0) mismatches the version that was used to compile PyTorch (12.4)'): with torch
    2.6's CUDA 12.4 build beside a CUDA 13 nvcc, `pip install` failed. A later candidate of torch's
    major version is taken; with none, the CPU-only extension is built, saying why."""
    setup = setup_functions(monkeypatch)
    cuda13 = fake_toolkit(tmp_path / "cuda13", "Cuda compilation tools, release 13.0, V13.0.88")
    cuda12 = fake_toolkit(tmp_path / "cuda12", "Cuda compilation tools, release 12.6, V12.6.77")
    quiet = fake_toolkit(tmp_path / "quiet", "a wrapper that does not say")
    assert setup["toolkit_release"](cuda13) == "13.0"
    assert setup["toolkit_release"](str(tmp_path / "missing")) is None
    monkeypatch.setenv("CUDA_HOME", cuda13)
    monkeypatch.setenv("CUDA_PATH", cuda12)
    assert setup["cuda_toolkit_home"]("13.0") == cuda13
    assert setup["cuda_toolkit_home"]("12.4") == cuda12  # CUDA_HOME's is of another major version
    monkeypatch.setenv("CUDA_PATH", quiet)  # an nvcc that does not say its release: torch does not check it
    assert setup["cuda_toolkit_home"]("12.4") == quiet

    # no candidate of CUDA 7 (this machine's own toolkits, if any, are newer): the CPU build, and why
    import torch

    monkeypatch.setenv("CUDA_PATH", cuda12)
    monkeypatch.setattr(torch.version, "cuda", "7.5")
    capsys.readouterr()
    (extension,), _ = setup["extension_build"]()
    assert extension.name == "vitaclip._C" and "cudart" not in extension.libraries
    assert not any(source.endswith(".cu") for source in extension.sources)
    said = capsys.readouterr().err
    assert "for the CPU only: torch is built for CUDA 7.5" in said
    assert f"{cuda13} (CUDA 13.0), {cuda12} (CUDA 12.6)" in said
    assert os.environ["CUDA_HOME"] == cuda13  # not replaced by a toolkit that was not taken


def test_a_triton_interpreter_that_cannot_run_beside_numpy_is_named():
    """Triton 3.6's interpreter (torch 2.11's) beside NumPy 2.4 failed every kernel test with 'only
    0-dimensional arrays can be converted to Python scalars'; the test run now stops at once, naming it."""
    from conftest import interpreter_numpy_clash

    problem = interpreter_numpy_clash("3.6.0", "2.4.6")
    assert "Triton 3.6.0's CPU interpreter" in problem and "NumPy 2.4.6" in problem and "numpy<2.4" in problem
    assert interpreter_numpy_clash("3.2.0+git4b3bb1f8", "2.5.0") is not None
    for triton_version, numpy_version in (("3.7.0", "2.4.6"), ("3.6.0", "2.3.5"), ("3.8.0", "1.26.4"),
                                          ("4.0.0", "3.0.0")):
        assert interpreter_numpy_clash(triton_version, numpy_version) is None
