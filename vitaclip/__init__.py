"""vitaclip: Vita-CLIP video recognition by prompting a frozen CLIP."""
from .backends import available_backends, register_backend
from .config import PRESETS, VitaCLIPConfig
from .model import DEFAULT_TEMPLATES, VitaCLIP
from .ops.summary import extension_available

__all__ = [
    "DEFAULT_TEMPLATES", "PRESETS", "VitaCLIP", "VitaCLIPConfig",
    "available_backends", "extension_available", "register_backend",
]
__version__ = "0.1.0"
