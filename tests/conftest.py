"""Test-session setup shared by every test module."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The mode
    # is fixed when a kernel is decorated (when its module is first imported), so it must be
    # set here, before any test module imports vitaclip.
    os.environ.setdefault("TRITON_INTERPRET", "1")
