"""The package's own kinds of bad input, free of torch so that the command line can name them
(as errors, not crashes) without importing the model first."""


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, decoded, or has fewer frames than needed."""


class ClassNamesError(ValueError):
    """Class names a model cannot take: none, empty or duplicate names, or another number or order of classes
    than its class-specific context was learned for."""


class WeightsUnavailable(RuntimeError):
    """open_clip could not get the weights asked for (e.g. a download without a network)."""
