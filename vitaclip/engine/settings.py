"""Checks of the engine's settings (TrainConfig, EvalConfig, PredictConfig), by name, before any
work: a wrong type or value otherwise fails mid-run in torch or Python, naming none of them."""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional


def check_count(name: str, value, least: int = 1) -> None:
    """An integer of at least `least`: a float passed as a count (eval_every=2.5 evaluated at step 5
    only, a loader's num_frames=2.5 gave clips of 3) or a str failed mid-run, naming nothing."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def check_number(name: str, value, least: Optional[float] = None, above: Optional[float] = None,
                 below: Optional[float] = None) -> None:
    """A finite real number, at least `least` or above `above`, and below `below`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")


def is_path(value) -> bool:
    """A path, not an empty one: that is the current folder, which would get a run's files."""
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))
