"""vitaclip: Vita-CLIP video recognition by prompting a frozen CLIP."""
import importlib

# each name's module, imported when the name is first used: `vitaclip --help`, a mistyped option
# and the data tools' worker processes do not wait for the model, torch's compiler and the kernels
_EXPORTS = {
    "DEFAULT_TEMPLATES": ".model", "VitaCLIP": ".model",
    "PRESETS": ".config", "VitaCLIPConfig": ".config",
    "available_backends": ".backends", "register_backend": ".backends",
    "extension_available": ".ops.summary",
    "load_model": ".engine.checkpoint",
    "EvalConfig": ".engine.evaluate", "evaluate": ".engine.evaluate",
    "PredictConfig": ".engine.predict", "predict": ".engine.predict",
    "TrainConfig": ".engine.train", "train": ".engine.train",
    "Split": ".engine.zeroshot", "zeroshot": ".engine.zeroshot",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:  # a sub-package or module (vitaclip.data, vitaclip.engine, ...), as an eager import made them
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":  # the module exists; something it imports does not
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
