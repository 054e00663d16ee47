"""Process-wide switches read from the environment."""
from __future__ import annotations

import os
from typing import Sequence


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """$name, which must be one of `choices`; `default` where unset."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {name}={value!r}")
    return value
