"""The restoration network of the context restoration pretext, posed as "find the corruption, fill it in"."""

from __future__ import annotations

import torch
from torch import nn

from .weights import _head_keys


class GatedRestoration(nn.Module):
    """``restored = x + m * (c - x)``: the backbone predicts, per voxel and channel, a gate ``m = sigmoid(g)``
    (where the image was corrupted) and the content ``c`` that belongs there; where the gate is shut the input
    passes unchanged, where it is open it is replaced by ``c``. Its output head (the last module owning
    parameters) starts at zero with the gate's bias at ``gate_bias``, so the untrained network is (nearly, a
    factor ``1 - sigmoid(gate_bias)``) the identity - the trivial solution of the restoration pretext.

    Why (measured in docs/methods/context_restoration.md): in context restoration (Chen et al., Med Image Anal
    2019) only the swapped patches differ from the original (about 8% of the voxels at the bundle's
    defaults). A U-Net that outputs the whole image stayed above the identity's L2 error; one that adds a
    correction to its input has to output the *negative* of the misplaced patch's fine detail from its coarse
    top layer and stalled at 0.67x the identity's error. A gate removes the misplaced content by a
    multiplication, so the backbone only has to say where and what belongs there: 0.64x after 500 steps of the
    same training. The L2 restoration loss (the paper's) and what is transferred are unchanged: ``backbone``
    alone is saved for fine-tuning, whose output layer is a new one.

    Args:
        backbone: a network with ``2 * C`` output channels for ``C`` input channels (content, then gate
            logits), e.g. MONAI's ``UNet``; 2D and 3D alike.
        gate_bias: the gate logits' initial bias (-5: the gate starts 0.7% open).

    Input ``(B, C, *spatial)`` -> output of the same shape.
    """

    def __init__(self, backbone: nn.Module, gate_bias: float = -5.0):
        super().__init__()
        self.backbone = backbone
        params = dict(backbone.named_parameters())
        with torch.no_grad():
            for name in _head_keys(backbone):
                params[name].zero_()
                if name.endswith("bias"):
                    params[name][params[name].shape[0] // 2:] = gate_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        c = x.shape[1]
        if out.shape[1] != 2 * c or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"GatedRestoration: the backbone's output {tuple(out.shape)} must have twice the input's "
                             f"{c} channels (content, gate logits) and its spatial shape {tuple(x.shape[2:])}")
        content, gate = out[:, :c], torch.sigmoid(out[:, c:])
        return x + gate * (content - x)
