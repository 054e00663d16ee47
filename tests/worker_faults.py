"""Decoding work that fails as a broken FFmpeg might, for the loader's worker-pool tests: the
worker processes import this module by name, so the fault happens inside them."""
import os

from vitaclip.data import loader


class FaultyTasks(loader._PyAVTasks):
    """Dies on a chunk holding a path with "crash" in its name."""

    def __getitem__(self, chunk):
        paths = [path for path, _ in chunk]
        if any("crash" in os.path.basename(path) for path in paths):
            os._exit(1)
        return super().__getitem__(chunk)
