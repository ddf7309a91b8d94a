"""Networks, blocks and weight loading of the medssl methods."""

from .weights import CheckpointMismatchError, initialise, load_pretrained

__all__ = ["CheckpointMismatchError", "initialise", "load_pretrained"]
