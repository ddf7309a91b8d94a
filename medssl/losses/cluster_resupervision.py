"""Cluster re-supervision of class activation maps (Kuang et al., "Cluster-Re-Supervision: Bridging the Gap
Between Image-Level and Pixel-Wise Labels for Weakly Supervised Medical Image Segmentation", IEEE JBHI
27(10):4890-4901, 2023, doi:10.1109/JBHI.2023.3300179, as interpreted here).

For each image with the image-level label "tumour":

1. the network's pixel features ``f`` (L2-normalised per pixel) inside the brain are clustered by
   k-means into ``K`` clusters (:func:`medssl.networks.kmeans`, batched in torch);
2. each cluster's contribution to the classification is the drop of the class score when its pixels
   are masked out of the class activation map ``M`` (the score is the global average of ``M``, so the
   drop is exact for it): ``drop_k = sum_{p in k} M_p / N``; its per-pixel contribution is
   ``c_k = drop_k * N / |k|`` (the mean activation over the cluster);
3. the clusters with ``c_k >= alpha * max_j c_j`` (and ``c_k > 0``) form the pixel-wise cluster map:
   whole clusters, so the map covers the full tumour rather than the CAM's most discriminative part
   (under-segmentation), and only clusters that drive the class score, so class-irrelevant tissue the
   blurry CAM covers is left out (over-segmentation).

Images labelled "no tumour" get an empty map. The map supervises the refined-CAM head with Dice + BCE
(``DiceCELoss(sigmoid=True)``); the maps are computed without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai.losses import DiceCELoss
from monai.utils import LossReduction


@torch.no_grad()
def cluster_maps(features: torch.Tensor, cam: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor | None = None,
                 num_clusters: int = 4, alpha: float = 0.5, iters: int = 10, seed: int | None = 0) -> dict:
    """Pixel-wise cluster maps (see the module docstring).

    Args:
        features: ``(B, E, *spatial)`` pixel features; cam: ``(B, 1, *spatial)`` class activation map;
        positive: ``(B,)`` image-level labels (> 0.5: tumour); valid: ``(B, *spatial)`` pixels that may
            be clustered (e.g. the brain), default all.
    Returns ``{"maps": (B, 1, *spatial) float 0/1, "labels": (B, N) cluster of each pixel (-1: not
    clustered), "contribution": (B, K) per-pixel contribution c_k, "drop": (B, K) score drop}``.
    """
    from ..networks.kmeans import kmeans

    b, e = features.shape[:2]
    spatial = features.shape[2:]
    f = F.normalize(features.detach().float().flatten(2).transpose(1, 2), dim=2)  # (B, N, E)
    n = f.shape[1]
    v = torch.ones(b, n, dtype=torch.bool, device=f.device) if valid is None else valid.reshape(b, n).bool()
    labels, _ = kmeans(f, num_clusters, iters=iters, seed=seed, valid=v)
    onehot = F.one_hot(labels.clamp(min=0), num_clusters).float() * (labels >= 0).unsqueeze(-1)  # (B, N, K)
    m = cam.detach().float().reshape(b, n)
    drop = torch.einsum("bn,bnk->bk", m, onehot) / n
    size = onehot.sum(1)
    contribution = torch.where(size > 0, drop * n / size.clamp(min=1), torch.full_like(drop, -float("inf")))
    best = contribution.max(1, keepdim=True).values
    chosen = (contribution >= alpha * best) & (contribution > 0) & (positive.reshape(b, 1) > 0.5)
    maps = torch.einsum("bnk,bk->bn", onehot, chosen.float()).clamp(max=1.0)
    return {"maps": maps.reshape(b, 1, *spatial), "labels": labels, "contribution": contribution, "drop": drop}


class ClusterReSupervisionLoss(_Loss):
    """``DiceCE(seg_logits, cluster_maps(features, cam, image_label, valid))`` (sigmoid); ``reduction``
    applies to the Dice part per image (MONAI's ``DiceCELoss`` semantics)."""

    def __init__(self, num_clusters: int = 4, alpha: float = 0.5, iters: int = 10, seed: int | None = 0,
                 reduction: LossReduction | str = LossReduction.MEAN, feature_pixels: int | None = None):
        """``feature_pixels``: the number of pixel features of one training image (e.g. the crop size),
        to refuse an impossible ``num_clusters`` when the config is parsed rather than mid-training."""
        super().__init__(reduction=LossReduction(reduction).value)
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if feature_pixels is not None and num_clusters > feature_pixels:
            raise ValueError(f"K={num_clusters} exceeds the {feature_pixels} feature pixels of one training image "
                             "(num_clusters must be at most the number of pixels clustered)")
        self.num_clusters, self.alpha, self.iters, self.seed = int(num_clusters), float(alpha), int(iters), seed
        self.dice_ce = DiceCELoss(sigmoid=True, reduction=self.reduction, smooth_nr=1e-5, smooth_dr=1e-5)
        self.last: dict = {}

    def forward(self, seg_logits: torch.Tensor, features: torch.Tensor, cam: torch.Tensor, image_label: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        self.last = cluster_maps(features, cam, image_label, valid, self.num_clusters, self.alpha, self.iters, self.seed)
        return self.dice_ce(seg_logits, self.last["maps"].to(seg_logits.dtype))
