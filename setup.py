"""Build script: the Python package, its Triton kernels (installed as vitaclip.kernels)
and, where it can be built, the C++/CUDA extension vitaclip._C."""
from setuptools import setup

setup(
    packages=["vitaclip", "vitaclip.ops", "vitaclip.data", "vitaclip.kernels"],
    package_dir={"vitaclip.kernels": "kernels"},
)
