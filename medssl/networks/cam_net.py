"""Classifier with class activation maps and a refined-CAM segmentation head (Cluster-Re-Supervision,
Kuang et al., IEEE JBHI 27(10):4890-4901, 2023), on a plain U-Net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai.networks.layers.factories import Conv

from .dfr_unet import DFRUNet


class CAMSegNet(nn.Module):
    """A plain U-Net (:class:`DFRUNet` with its four elements off) with three heads:

    - classification: a 1x1 convolution of the features at stride ``cam_stride`` gives the class activation
      map (Zhou et al., CVPR 2016) at that resolution; its global average is the image-level tumour logit,
      so the CAM is exactly each position's share of the class score;
    - segmentation (the *refined CAM*): the U-Net's own output, one logit per pixel, trained from
      cluster maps (:class:`medssl.engines.ClusterReSupervisionIteration`);
    - reconstruction (optional): a 1x1 convolution of the last decoder features predicting one image
      channel (inter-modality reconstruction from a masked input, the auxiliary task).

    ``cam_stride`` picks the features the classifier sits on: ``None`` (or ``2 ** (len(channels) - 1)``) the
    bottleneck (a 6x6 map on a 96x96 slice with 5 levels); a finer stride (8, 4, 2 or 1 with 5 levels) the
    output of the decoder level at that stride. Why the decoder: its features have passed through the
    bottleneck (a receptive field over the whole slice) and joined the encoder's skip at that resolution,
    so the classifier still reads deep features, at the resolution CAM / Grad-CAM work on 2-D slices gets
    from a backbone of smaller output stride - here without changing the U-Net; the encoder's own stride-4
    features would be shallow (a receptive field of 35 pixels). At stride 4 (a 24x24 map on 96x96) a whole
    tumour of a few tens of pixels spans several CAM positions instead of one or two at stride 16. Only the
    classifier's input channels change with the stride; a stride the network cannot provide raises
    ``ValueError`` naming the allowed ones.

    ``forward(x)`` returns the refined-CAM logits ``(B, 1, *spatial)`` (what inferers and exports call);
    :meth:`outputs` returns every head plus the pixel features; :meth:`classify` the logits ``(B, 1)``;
    :meth:`class_activation_map` the CAM at its own resolution ``(B, 1, *spatial / cam_stride)``.
    Inputs must be divisible by ``2 ** (len(channels) - 1)``; 2D and 3D alike.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 4, channels: Sequence[int] = (16, 32, 64, 128, 256),
                 reconstruction: bool = True, dropout: float = 0.0, cam_stride: int | None = None):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.backbone = DFRUNet(spatial_dims, in_channels, 1, channels, channel_attention=False,
                                spatial_attention=False, dilation=False, compression=False, dropout=dropout)
        strides = [2**k for k in range(len(channels))]  # the last decoder level's (1) ... the bottleneck's
        cam_stride = strides[-1] if cam_stride is None else cam_stride
        if isinstance(cam_stride, bool) or cam_stride not in strides:
            raise ValueError(f"cam_stride must be one of {strides} (the strides of the bottleneck and the decoder "
                             f"levels of a CAMSegNet with {len(channels)} levels), got {cam_stride!r}")
        self.cam_stride = cam_stride
        self.cam_level = len(channels) - 1 - strides.index(cam_stride)  # decoder levels run before the classifier
        conv = Conv[Conv.CONV, spatial_dims]
        self.classifier = conv(channels[-1 - self.cam_level], 1, 1)
        self.reconstruction = conv(channels[0], 1, 1) if reconstruction else None

    @property
    def cam_layer(self) -> str:
        """The name of the module whose output the classifier reads (MONAI's ``GradCAM`` target layer)."""
        return "backbone.bottleneck" if self.cam_level == 0 else f"backbone.decoders.{self.cam_level - 1}"

    def _levels(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """The bottleneck features, then the outputs of the first ``depth`` decoder levels (deepest first)."""
        h, skips = self.backbone._encode(x)
        levels = [h]
        for i, level in enumerate(self.backbone.decoders[:depth]):
            levels.append(level(levels[-1], skips[-1 - i]))
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def class_activation_map(self, x: torch.Tensor) -> torch.Tensor:
        """The CAM ``(B, 1, *spatial / cam_stride)``; its mean over positions is :meth:`classify`."""
        return self.classifier(self._levels(x, self.cam_level)[-1])

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_activation_map(x).flatten(2).mean(2)

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``seg`` (B, 1, *S) refined-CAM logits, ``cls`` (B,) tumour logits, ``cam`` (B, 1, *S) the class
        activation map upsampled to the input, ``features`` (B, channels[0], *S) pixel features."""
        levels = self._levels(x, len(self.backbone.decoders))
        features = levels[-1]
        cam = self.classifier(levels[self.cam_level])
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return {"seg": self.backbone.head(features), "cls": cam.flatten(1).mean(1),
                "cam": F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False), "features": features}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if self.reconstruction is None:
            raise RuntimeError("this CAMSegNet was built with reconstruction=False")
        return self.reconstruction(self.backbone.forward_features(x)[1])


class _Classifier(nn.Module):
    """``net.classify`` as a module's forward (what MONAI's GradCAM calls)."""

    def __init__(self, net: CAMSegNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classify(x)


class CAMOutput(nn.Module):
    """A :class:`CAMSegNet` seen through one of its localisation outputs, as a tumour probability map
    ``(B, 1, *spatial)`` in [0, 1] (threshold it at 0.5 for a mask):

    - ``"refined"``: ``sigmoid`` of the refined-CAM head (the method);
    - ``"cam"``: the class activation map, ReLU'd and divided by its maximum per image (plain CAM);
    - ``"gradcam"``: MONAI's ``GradCAM`` of the classification logit at the layer the classifier reads
      (:attr:`CAMSegNet.cam_layer`: the bottleneck by default; normalised per image).

    With ``gate`` the map is zeroed on images the classifier calls tumour-free (probability < 0.5): a
    normalised CAM always has a maximum of 1, even without tumour, and the refined head, trained on
    cluster maps of tumour images, fires on tumour-free slices too (measured: every tumour-free test
    slice had a predicted pixel without the gate). Turn it off for a network whose classifier was not
    trained (``method=supervised``).
    """

    MODES = ("refined", "cam", "gradcam")

    def __init__(self, net: CAMSegNet, mode: str = "refined", gate: bool = True):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"output must be one of {list(self.MODES)}, got {mode!r}")
        self.net, self.mode, self.gate = net, mode, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "gradcam":
            out = self.net.outputs(x)
            logit = out["cls"]
            if self.mode == "refined":
                cam = torch.sigmoid(out["seg"])
            else:
                cam = F.relu(out["cam"])
                cam = cam / cam.flatten(1).amax(1).clamp(min=1e-8).reshape(-1, *([1] * (cam.ndim - 1)))
        else:
            from monai.visualize import GradCAM

            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                gradcam = GradCAM(nn_module=_Classifier(self.net), target_layers=f"net.{self.net.cam_layer}")
                cam = gradcam(x, class_idx=0)
            with torch.no_grad():
                logit = self.net.classify(x.detach())[:, 0]
            cam = cam.detach()
        if self.gate:
            cam = cam * (torch.sigmoid(logit) >= 0.5).to(cam.dtype).reshape(-1, *([1] * (cam.ndim - 1)))
        return cam
