"""Imported by name in a fork server's worker: what the worker had imported before this module,
which imports nothing of the package."""
import sys


def loader_was_imported() -> bool:
    return "vitaclip.data.loader" in sys.modules
