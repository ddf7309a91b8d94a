"""Heads on a backbone's bottleneck features (any network with an ``encode(x)`` method)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class EncoderHead(nn.Module):
    """``backbone.encode(x)`` -> global average pool -> MLP (Linear-BN-ReLU ... Linear).

    The pretext heads of the medssl methods: the Barlow Twins projector (``dims=(512, 512)``) and the
    SLeM combination classifier (``dims=(hidden, num_combinations)``, logits for ``CrossEntropyLoss``).
    Only ``backbone`` carries over to fine-tuning.

    Input ``(B, C, *spatial)`` -> ``(B, dims[-1])``; 2D and 3D alike.
    """

    def __init__(self, backbone: nn.Module, in_features: int, dims: Sequence[int] = (512, 512)):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        sizes = [in_features, *dims]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=i == len(sizes) - 2))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode(x).flatten(2).mean(2))
