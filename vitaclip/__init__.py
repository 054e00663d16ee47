"""vitaclip: Vita-CLIP video recognition by prompting a frozen CLIP."""
from .config import PRESETS, VitaCLIPConfig
from .ops.summary import extension_available

__all__ = ["PRESETS", "VitaCLIPConfig", "extension_available"]
__version__ = "0.1.0"
