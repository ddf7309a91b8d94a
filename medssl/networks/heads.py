"""Heads on a backbone's bottleneck features (any network with an ``encode(x)`` method)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


class BlockMixHead(nn.Module):
    """The SLeM combination classifier, position-aware: ``backbone.encode(x)`` -> adaptive average pool to
    the pretext's block ``grid`` -> at every block position its own classifier (1x1 grouped convolutions,
    Linear-ReLU-Linear per position) of which input modality each of the M channels holds there -> the
    logits of the K combinations.

    A combination (:func:`medssl.transforms.block_mix.combination_table`, ``table[k][c, b]`` = the modality in
    channel ``c`` at block ``b``) is scored as the sum over block positions and channels of the
    log-probability, predicted from the features *at that block*, that channel ``c`` holds modality
    ``table[k][c, b]``. So the K-class output (``CrossEntropyLoss`` on the transform's class index, as in
    the paper) is built from per-block predictions: a global pool of the bottleneck (``EncoderHead``)
    mixes the blocks and cannot tell which position holds which permutation.

    Args:
        backbone: a network with ``encode(x)`` (e.g. :class:`medssl.networks.CFBUNet`); only it carries
            over to fine-tuning.
        in_features: channels of ``backbone.encode(x)``.
        grid: blocks per spatial axis, the transform's ``blocks`` (blocks numbered in C order).
        combinations: the transform's ``(K, M, B)`` table (``RandModalityBlockMix.combinations``).
        hidden: width of each position's hidden layer.

    Input ``(N, M, *spatial)`` -> ``(N, K)`` logits; :meth:`block_logits` gives the per-position
    ``(N, B, M, M)`` (position, channel, modality) logits. 2D and 3D alike. No batch normalisation: the
    pretext batches are 2 crops, over which a batch norm of a pooled feature is about its sign.
    """

    def __init__(self, backbone: nn.Module, in_features: int, grid: Sequence[int], combinations,
                 hidden: int = 256):
        super().__init__()
        from monai.networks.layers.factories import Pool

        self.backbone = backbone
        self.grid = tuple(int(g) for g in grid)
        table = torch.as_tensor(np.array(combinations, dtype=np.int64))  # a copy: the transform's table is read-only
        if table.ndim != 3:
            raise ValueError(f"combinations must be a (K, M, B) table, got shape {tuple(table.shape)}")
        k, m, b = table.shape
        if b != math.prod(self.grid):
            raise ValueError(f"combinations cover {b} blocks but the grid {self.grid} has {math.prod(self.grid)}")
        self.num_modalities, self.num_blocks = m, b
        self.pool = Pool[Pool.ADAPTIVEAVG, len(self.grid)](self.grid)
        self.head = nn.Sequential(nn.Conv1d(b * in_features, b * hidden, 1, groups=b), nn.ReLU(inplace=True),
                                  nn.Conv1d(b * hidden, b * m * m, 1, groups=b))
        # (K, B, M, M) one-hot of (position, channel) -> modality: combination logits by one contraction
        self.register_buffer("combination_onehot", combination_onehot(table), persistent=False)

    def block_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, B, M, M)``: at block ``b``, for channel ``c``, logits over the modality it holds."""
        f = self.pool(self.backbone.encode(x)).flatten(2)  # (N, C, B), blocks in C order
        n, c, b = f.shape
        out = self.head(f.transpose(1, 2).reshape(n, b * c, 1))  # groups = positions: block b sees only f[..., b]
        return out.reshape(n, b, self.num_modalities, self.num_modalities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.block_logits(x), dim=-1)
        return score_combinations(logp, self.combination_onehot)


def combination_onehot(table: torch.Tensor) -> torch.Tensor:
    """A ``(K, M, B)`` combination table (``table[k][c, b]`` = the modality in channel ``c`` at block ``b``) as the
    ``(K, B, M, M)`` one-hot of (block, channel) -> modality that :func:`score_combinations` contracts with."""
    return torch.nn.functional.one_hot(table.permute(0, 2, 1), table.shape[1]).float()


def score_combinations(block_log_prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """``(N, B, M, M)`` per-block (channel, modality) log-probabilities -> ``(N, K)``: each combination's score is
    the sum of the log-probabilities of its layout (``onehot`` from :func:`combination_onehot`)."""
    return torch.einsum("nbcm,kbcm->nk", block_log_prob, onehot.to(block_log_prob.dtype))
