"""MONAI's ``UNet`` with a contextual fusion block on the features of one encoder level (SLeM, Wang et al. 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet

from .blocks import ContextualFusionBlock


class CFBUNet(UNet):
    """``monai.networks.nets.UNet`` with a :class:`ContextualFusionBlock` on the features of encoder level
    ``fusion_level``; every other argument is ``UNet``'s.

    Args:
        context_fusion: add the CFB; ``False`` builds exactly MONAI's ``UNet`` (same state-dict keys,
            so checkpoints of the plain network load into it and vice versa).
        fusion_dilations: dilations of the CFB's convolution branches (it also has a global-context branch).
        fusion_level: the encoder level whose output the CFB refines, ``0 <= fusion_level < len(channels)``:
            level ``i < len(channels) - 1`` is the down layer with ``channels[i]`` output channels at
            ``1 / prod(strides[:i + 1])`` of the input size; the CFB follows it, so its output feeds both
            that level's skip connection and the deeper levels. ``len(channels) - 1`` is the bottom
            (bottleneck) layer. The default 1 is 16^3 for a 64^3 crop with strides 2: a 3x3 kernel of
            dilation 3 spans 7 positions there, where at the 4^3 bottleneck it would mostly see padding
            (:meth:`fusion_size`).

    ``encode(x)`` runs only the down path and the bottom layer and returns the bottleneck features
    ``(B, channels[-1], *spatial / prod(strides))`` (through the CFB, which is on the down path): what
    the SLeM pretext classifier (:class:`medssl.networks.BlockMixHead`) sees.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], context_fusion: bool = True, fusion_dilations: Sequence[int] = (1, 2, 3),
                 fusion_level: int = 1, **kwargs):
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kwargs)
        self.context_fusion = context_fusion
        self.fusion_dilations = tuple(int(d) for d in fusion_dilations)
        self.fusion_level = int(fusion_level)
        if not 0 <= self.fusion_level < len(channels):
            raise ValueError(f"fusion_level must be in range({len(channels)}) (one per entry of channels "
                             f"{tuple(channels)}), got {fusion_level}")
        if context_fusion:
            cfb = ContextualFusionBlock(self.dimensions, channels[self.fusion_level], dilations=self.fusion_dilations,
                                        act=self.act, norm=self.norm, dropout=self.dropout)
            parent, index = self._level(self.fusion_level)
            if isinstance(parent, SkipConnection):  # the bottom layer
                parent.submodule = nn.Sequential(parent.submodule, cfb)
            else:
                parent[index] = nn.Sequential(parent[index], cfb)

    def _level(self, level: int) -> tuple[nn.Module, int | None]:
        """(container, index) of encoder level ``level``'s down layer; for the bottom layer, its
        ``SkipConnection`` (index None)."""
        block = self.model  # UNet nests Sequential(down, SkipConnection(inner), up) down to the bottom layer
        for _ in range(min(level, len(self.channels) - 2)):
            block = block[1].submodule
        return (block[1], None) if level == len(self.channels) - 1 else (block, 0)

    def fusion_size(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """The spatial size of the feature map the CFB sees for an input of ``spatial_size`` (stride-2
        convolutions of MONAI's UNet give ``ceil(size / stride)`` per level)."""
        size = [int(s) for s in spatial_size]
        for s in self.strides[:min(self.fusion_level + 1, len(self.strides))]:
            size = [math.ceil(v / s) for v in size]
        return tuple(size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        block = self.model
        while True:
            x = block[0](x)
            inner = block[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                block = inner
            else:
                return inner(x)
