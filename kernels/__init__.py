"""Triton kernels of vitaclip (installed as vitaclip.kernels)."""
