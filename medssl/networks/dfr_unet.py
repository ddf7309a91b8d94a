"""The segmentation network of Zhang et al., "A deep feature refinement self-supervised learning
algorithm for medical image annotation", Applied Intelligence 55(13), 2025
(doi:10.1007/s10489-025-06737-2): a U-Net with spatial attention, channel attention, spatial
information compression and dilated convolutions. Each element has a switch, so the ablations are
one argument each; with every switch off the network is a plain U-Net (same depth and widths).

How each element is built here (the paper gives no code):
- channel attention: MONAI ``ChannelSELayer`` (squeeze-and-excitation) after every conv block;
- spatial attention: a CBAM-style gate (:class:`medssl.networks.blocks.SpatialGate`) after it;
- dilated convolutions: the bottleneck is a :class:`DilatedContextBlock` (dilations 1, 2, 4 in
  parallel) instead of a plain conv block;
- spatial information compression: each skip connection is compressed by a 1x1 convolution to half
  its channels before it is concatenated in the decoder, so the decoder receives a compact summary of
  the high-resolution detail instead of the full encoder features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.layers.factories import Conv

from .blocks import DilatedContextBlock, SpatialGate


class ConvBlock(nn.Sequential):
    """Two 3x3 conv-norm-act layers, then optional channel (SE) and spatial (CBAM) attention."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channel_attention: bool,
                 spatial_attention: bool, act, norm, dropout: float):
        layers = [Convolution(spatial_dims, in_channels, out_channels, act=act, norm=norm, dropout=dropout),
                  Convolution(spatial_dims, out_channels, out_channels, act=act, norm=norm, dropout=dropout)]
        if channel_attention:
            layers.append(ChannelSELayer(spatial_dims, out_channels, r=2))
        if spatial_attention:
            layers.append(SpatialGate(spatial_dims))
        super().__init__(*layers)


class DecoderLevel(nn.Module):
    """Upsample, concatenate the (optionally compressed) skip features, conv block."""

    def __init__(self, up: nn.Module, skip: nn.Module, block: nn.Module):
        super().__init__()
        self.up, self.skip, self.block = up, skip, block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), self.skip(skip)], dim=1))


class DFRUNet(nn.Module):
    """Attention U-Net of the deep-feature-refinement method, for 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels / out_channels: input channels and output logits channels.
        channels: widths of the levels, the last one being the bottleneck; inputs must be divisible
            by ``2 ** (len(channels) - 1)`` along every spatial axis.
        channel_attention, spatial_attention, dilation, compression: the four elements (see module doc).
        act, norm, dropout: as in MONAI's ``Convolution``; ``dropout`` also serves MONAI Label's
            epistemic scoring.

    ``forward(x)`` returns logits ``(B, out_channels, *spatial)``; ``forward_features(x)`` returns
    ``(logits, embedding)`` with the last decoder features ``(B, channels[0], *spatial)`` (the pixel
    embeddings of the lesion-aware contrastive loss); ``encode(x)`` returns the bottleneck features
    ``(B, channels[-1], *spatial / 2 ** (len(channels) - 1))`` (what Barlow Twins pretrains).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), channel_attention: bool = True,
                 spatial_attention: bool = True, dilation: bool = True, compression: bool = True,
                 act="PRELU", norm="INSTANCE", dropout: float = 0.0):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {channels}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)

        def block(cin, cout):
            return ConvBlock(spatial_dims, cin, cout, channel_attention, spatial_attention, act, norm, dropout)

        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = in_channels
        for c in channels[:-1]:
            self.encoders.append(block(cin, c))
            self.downs.append(Convolution(spatial_dims, c, c, strides=2, act=act, norm=norm, dropout=dropout))
            cin = c
        self.bottleneck = (DilatedContextBlock(spatial_dims, cin, channels[-1], act=act, norm=norm, dropout=dropout)
                           if dilation else block(cin, channels[-1]))
        self.decoders = nn.ModuleList()  # deepest first
        cprev = channels[-1]
        for c in reversed(channels[:-1]):
            up = Convolution(spatial_dims, cprev, c, strides=2, kernel_size=3, act=act, norm=norm, is_transposed=True)
            skip = Conv[Conv.CONV, spatial_dims](c, c // 2, 1) if compression else nn.Identity()
            self.decoders.append(DecoderLevel(up, skip, block(c + (c // 2 if compression else c), c)))
            cprev = c
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, 1)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips: list[torch.Tensor] = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x)
            skips.append(x)
            x = down(x)
        return self.bottleneck(x), skips

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[0]

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, level in enumerate(self.decoders):
            x = level(x, skips[-1 - i])
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, skips = self._encode(x)
        x = self._decode(x, skips)
        return self.head(x), x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
