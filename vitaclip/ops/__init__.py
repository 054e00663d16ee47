"""Ops of a Vita-CLIP layer, each with a plain PyTorch reference beside its fast version."""
