"""Build script: the Python package, its Triton kernels (installed as vitaclip.kernels)
and, where it can be built, the C++/CUDA extension vitaclip._C (the summary attention op).

vitaclip._C is a CUDAExtension when torch is a CUDA build and a CUDA toolkit (nvcc and
libcudart) is found, a CPU-only CppExtension otherwise, and skipped when VITACLIP_DISABLE_EXT=1
or torch is not importable (the package then runs the plain PyTorch path). Build in place on
a GPU machine with
    TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_toolkit_home():
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH, else the one nvcc belongs to.

    nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), where torch's guess (two
    directories up) has no libcudart to link; then /usr/local/cuda is the usual place."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        has_cudart = any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_cudart:
            return home
    return None


def extension_build():
    """(ext_modules, cmdclass) for vitaclip._C; nothing when it is not to be built."""
    if os.environ.get("VITACLIP_DISABLE_EXT", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        return [], {}
    cuda_home = cuda_toolkit_home() if torch.version.cuda is not None else None
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
