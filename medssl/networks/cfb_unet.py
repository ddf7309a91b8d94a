"""MONAI's ``UNet`` with a contextual fusion block after its bottom layer (SLeM, Wang et al. 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet

from .blocks import ContextualFusionBlock


class CFBUNet(UNet):
    """``monai.networks.nets.UNet`` whose bottom (bottleneck) layer is followed by a
    :class:`ContextualFusionBlock`; every other argument is ``UNet``'s.

    Args:
        context_fusion: append the CFB; ``False`` builds exactly MONAI's ``UNet`` (same state-dict keys,
            so checkpoints of the plain network load into it and vice versa).
        fusion_dilations: dilations of the CFB's convolution branches (it also has a global-context branch).

    ``encode(x)`` runs only the down path and the bottom layer (+ CFB) and returns the bottleneck features
    ``(B, channels[-1], *spatial / prod(strides))``: what the SLeM pretext classifier (and any
    :class:`medssl.networks.EncoderHead`) sees.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], context_fusion: bool = True, fusion_dilations: Sequence[int] = (1, 2, 3),
                 **kwargs):
        # UNet.__init__ calls _get_bottom_layer, so these must exist first
        self.context_fusion = context_fusion
        self.fusion_dilations = tuple(fusion_dilations)
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kwargs)

    def _get_bottom_layer(self, in_channels: int, out_channels: int) -> nn.Module:
        bottom = super()._get_bottom_layer(in_channels, out_channels)
        if not self.context_fusion:
            return bottom
        cfb = ContextualFusionBlock(self.dimensions, out_channels, dilations=self.fusion_dilations, act=self.act,
                                    norm=self.norm, dropout=self.dropout)
        return nn.Sequential(bottom, cfb)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # UNet nests Sequential(down, SkipConnection(inner), up) down to the bottom layer
        block = self.model
        while True:
            x = block[0](x)
            inner = block[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                block = inner
            else:
                return inner(x)
