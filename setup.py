"""Build script: the Python package, its Triton kernels (installed as vitaclip.kernels)
and, where it can be built, the C++/CUDA extension vitaclip._C (the summary attention op).

vitaclip._C is a CUDAExtension when torch is a CUDA build and a CUDA toolkit (nvcc and
libcudart) of torch's CUDA major version is found, a CPU-only CppExtension otherwise (torch
refuses to build with a toolkit of another major version; its GPU then takes the PyTorch
path), and skipped when VITACLIP_DISABLE_EXT=1 or torch is not importable (the package then
runs the plain PyTorch path). Build in place on a GPU machine with
    TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def toolkit_release(home):
    """The CUDA release ("12.4") of the toolkit at `home` as its nvcc says, or None."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cuda_toolkit_home(torch_cuda):
    """The CUDA toolkit to build with, for a torch built with CUDA `torch_cuda` ("12.4"): the first of
    CUDA_HOME, CUDA_PATH, the one nvcc belongs to, /usr/local/cuda and /usr/local/cuda-* that has
    nvcc, libcudart and torch's major version (or an nvcc that does not say its release, which torch
    does not check either); None if none has (the reason printed).

    nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), where torch's guess (two
    directories up) has no libcudart to link; then /usr/local/cuda is the usual place."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    wanted, other_releases = torch_cuda.split(".")[0], []
    for home in dict.fromkeys(os.path.realpath(c) for c in candidates if c):
        has_cudart = any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if not (os.path.exists(os.path.join(home, "bin", "nvcc")) and has_cudart):
            continue
        release = toolkit_release(home)  # (one nvcc does not tell, torch builds with unchecked)
        if release is None or release.split(".")[0] == wanted:
            return home
        other_releases.append(f"{home} (CUDA {release})")
    if other_releases:
        print(f"vitaclip: building the summary op for the CPU only: torch is built for CUDA {torch_cuda}, and the "
              f"CUDA toolkits found are of other major versions: {', '.join(other_releases)}. The GPU takes the "
              f"PyTorch path; to build its CUDA kernels, point CUDA_HOME at a CUDA {wanted} "
              f"toolkit or install a torch built for the toolkit's CUDA.", file=sys.stderr)
    return None


def extension_build():
    """(ext_modules, cmdclass) for vitaclip._C; nothing when it is not to be built."""
    if os.environ.get("VITACLIP_DISABLE_EXT", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        return [], {}
    cuda_home = cuda_toolkit_home(torch.version.cuda) if torch.version.cuda is not None else None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    if cuda_home is not None:
        if not torch.cuda.is_available():  # no GPU to read the arch from: the archs we run on, and PTX for newer
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extension = CUDAExtension(
            "vitaclip._C", sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        extension = CppExtension("vitaclip._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    packages=[*find_packages(include=["vitaclip", "vitaclip.*"]), "vitaclip.kernels"],
    package_dir={"vitaclip.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
