"""vitaclip: Vita-CLIP video recognition by prompting a frozen CLIP."""
from .backends import available_backends, register_backend
from .config import PRESETS, VitaCLIPConfig
from .model import DEFAULT_TEMPLATES, VitaCLIP
from .ops.summary import extension_available
from .engine.checkpoint import load_model
from .engine.evaluate import EvalConfig, evaluate
from .engine.predict import PredictConfig, predict
from .engine.train import TrainConfig, train
from .engine.zeroshot import Split, zeroshot

__all__ = [
    "DEFAULT_TEMPLATES", "PRESETS", "VitaCLIP", "VitaCLIPConfig",
    "available_backends", "extension_available", "register_backend",
    "EvalConfig", "PredictConfig", "Split", "TrainConfig", "evaluate", "load_model", "predict", "train", "zeroshot",
]
__version__ = "0.1.0"
