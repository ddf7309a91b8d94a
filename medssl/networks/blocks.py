"""Building blocks shared by medssl networks (all take ``spatial_dims``: one implementation for 2D and 3D)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool


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
    """Parallel 3x3 convolutions with dilations ``dilations`` (same number of channels each), optionally
    a global-context branch (global average pooling -> 1x1 convolution, broadcast back over the
    positions), concatenated and fused by a 1x1 convolution, plus a residual path: receptive fields
    of several sizes at one resolution.

    Input ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 2, 4),
                 act="PRELU", norm="INSTANCE", dropout: float = 0.0, global_context: bool = False):
        super().__init__()
        self.branches = nn.ModuleList(
            Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, dilation=d, padding=d, act=act,
                        norm=norm, dropout=dropout) for d in dilations)
        # no normalisation on the pooled branch: an instance norm of one value per channel is zero
        self.pool = (nn.Sequential(Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
                                   Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, act=act,
                                               norm=None))
                     if global_context else None)
        n_branches = len(dilations) + int(global_context)
        self.fuse = Convolution(spatial_dims, out_channels * n_branches, out_channels, kernel_size=1, act=act,
                                norm=norm)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        if self.pool is not None:
            feats.append(self.pool(x).expand_as(feats[0]))
        return self.fuse(torch.cat(feats, dim=1)) + self.skip(x)


class ContextualFusionBlock(DilatedContextBlock):
    """Contextual fusion block (CFB) of SLeM (Wang et al., 2025): parallel branches of different receptive
    fields - 3x3 convolutions with ``dilations`` and the global context of the whole input - fused by a
    1x1 convolution, with a residual path, so that one feature map carries context for tumours of very
    different sizes.

    Channel-preserving by default (``out_channels = in_channels``), so it can follow the learned features
    of any MONAI-style encoder-decoder, e.g. appended to a ``UNet``'s bottom layer (:class:`CFBUNet`).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int | None = None,
                 dilations: Sequence[int] = (1, 2, 3), act="PRELU", norm="INSTANCE", dropout: float = 0.0):
        super().__init__(spatial_dims, in_channels, out_channels or in_channels, dilations=dilations, act=act,
                         norm=norm, dropout=dropout, global_context=True)
