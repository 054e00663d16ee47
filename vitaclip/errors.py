"""The package's own kinds of bad input, free of torch so that the command line can name them
(as errors, not crashes) without importing the model first."""


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, decoded, or has fewer frames than needed."""


class WeightsUnavailable(RuntimeError):
    """open_clip could not get the weights asked for (e.g. a download without a network)."""
