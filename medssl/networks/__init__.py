"""Networks, blocks and weight loading of the medssl methods."""

from .blocks import ContextualFusionBlock, DilatedContextBlock, SpatialGate
from .cfb_unet import CFBUNet
from .dfr_unet import DFRUNet
from .cam_net import CAMOutput, CAMSegNet
from .heads import BlockMixHead, EncoderHead
from .paired import PairedNetwork
from .restoration import GatedRestoration
from .weights import CheckpointMismatchError, initialise, load_pretrained

__all__ = ["BlockMixHead", "CAMOutput", "CAMSegNet", "CFBUNet", "CheckpointMismatchError", "ContextualFusionBlock", "DFRUNet", "EncoderHead", "PairedNetwork", "GatedRestoration", "DilatedContextBlock", "SpatialGate", "initialise", "load_pretrained"]
