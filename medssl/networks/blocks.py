"""Building blocks shared by medssl networks (all take ``spatial_dims``: one implementation for 2D and 3D)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv


class SpatialGate(nn.Module):
    """CBAM-style spatial attention (Woo et al., ECCV 2018): the channel-wise mean and max maps are
    convolved (``kernel_size``) into one sigmoid gate that re-weights every position.

    Input ``(B, C, *spatial)`` -> output of the same shape. (MONAI's ``SpatialAttentionBlock`` is
    self-attention over positions, not this gate.)
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 7):
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](2, 1, kernel_size, padding=kernel_size // 2)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class DilatedContextBlock(nn.Module):
    """Parallel 3x3 convolutions with dilations ``dilations`` (same number of channels each), concatenated
    and fused by a 1x1 convolution, plus a residual path: a larger receptive field at one resolution.

    Input ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 2, 4),
                 act="PRELU", norm="INSTANCE", dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(
            Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, dilation=d, padding=d, act=act,
                        norm=norm, dropout=dropout) for d in dilations)
        self.fuse = Convolution(spatial_dims, out_channels * len(dilations), out_channels, kernel_size=1, act=act,
                                norm=norm)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([b(x) for b in self.branches], dim=1)) + self.skip(x)
