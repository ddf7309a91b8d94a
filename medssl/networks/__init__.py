"""Networks, blocks and weight loading of the medssl methods."""

from .blocks import DilatedContextBlock, SpatialGate
from .dfr_unet import DFRUNet
from .weights import CheckpointMismatchError, initialise, load_pretrained

__all__ = ["CheckpointMismatchError", "DFRUNet", "DilatedContextBlock", "SpatialGate", "initialise", "load_pretrained"]
