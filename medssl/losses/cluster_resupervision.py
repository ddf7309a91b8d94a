"""Cluster re-supervision of class activation maps (Kuang et al., "Cluster-Re-Supervision: Bridging the Gap
Between Image-Level and Pixel-Wise Labels for Weakly Supervised Medical Image Segmentation", IEEE JBHI
27(10):4890-4901, 2023, doi:10.1109/JBHI.2023.3300179, as interpreted here).

For each image with the image-level label "tumour":

1. the network's pixel features ``f`` (L2-normalised per pixel) inside the brain are clustered by
   k-means into ``K`` clusters (:func:`medssl.networks.kmeans`, batched in torch);
2. each cluster's contribution to the classification is measured (``contribution``):

   - ``"masked"`` (the method's default, the paper's "contribution to the final classification"): the
     image is re-classified with the cluster's pixels masked out of the *input* (set to 0, the brain mean
     of the z-normalised image and the background value), all ``K`` masked copies of all tumour images
     in one batched forward pass of the classifier (:func:`masked_contributions`); the contribution is
     the drop of the tumour score (logit) from the unmasked image's: ``c_k = s(x) - s(x with cluster k
     masked)``. It is measured by the classifier, not by the CAM that the clusters are meant to correct;
   - ``"cam_mean"`` (the comparison): the mean activation of the class activation map ``M`` over the
     cluster, ``c_k = sum_{p in k} M_p / |k|`` - the drop of the class score (the global average of
     ``M``) when the cluster is masked out of ``M`` itself, per pixel of the cluster. It ranks the
     clusters by the very map it is meant to correct;
3. the clusters with ``c_k >= alpha * max_j c_j`` (and ``c_k > 0``) form the pixel-wise cluster map:
   whole clusters, so the map covers the full tumour rather than the CAM's most discriminative part
   (under-segmentation), and only clusters that drive the class score, so class-irrelevant tissue the
   blurry CAM covers is left out (over-segmentation).

Images labelled "no tumour" get an empty map. The map supervises the refined-CAM head with Dice + BCE
(``DiceCELoss(sigmoid=True)``); the maps are computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai.losses import DiceCELoss
from monai.utils import LossReduction

CONTRIBUTIONS = ("masked", "cam_mean")


@torch.no_grad()
def masked_contributions(classifier: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                         labels: torch.Tensor, num_clusters: int, fill: float = 0.0) -> torch.Tensor:
    """Each cluster's contribution to the classification of its image: the drop of the tumour score when
    the cluster's pixels are masked out of the input.

    Args:
        classifier: image batch ``(M, C, *spatial)`` -> tumour logits ``(M,)`` or ``(M, 1)`` (e.g.
            :meth:`medssl.networks.CAMSegNet.classify`).
        image: ``(B, C, *spatial)`` the classified images; labels: ``(B, N)`` cluster of each pixel
            (``N = prod(spatial)``, ``-1``: not clustered, never masked).
        num_clusters: ``K``; fill: the value masked pixels get in every channel.
    Returns ``(B, K)``: ``score(image) - score(image with cluster k masked)``. One forward pass of the
    ``B * (K + 1)`` stacked inputs (each image unmasked, then its ``K`` masked copies), so the scores
    compared come from the same pass; an empty cluster contributes 0.
    """
    b, c = image.shape[:2]
    spatial = image.shape[2:]
    k = int(num_clusters)
    keep = labels.reshape(b, 1, *spatial) != torch.arange(k, device=labels.device).reshape(1, k, *([1] * len(spatial)))
    masked = torch.where(keep.unsqueeze(2), image.unsqueeze(1), torch.as_tensor(fill, dtype=image.dtype, device=image.device))
    stacked = torch.cat([image.unsqueeze(1), masked], dim=1).reshape(b * (k + 1), c, *spatial)
    scores = classifier(stacked).float().reshape(b, k + 1)
    return scores[:, :1] - scores[:, 1:]


@torch.no_grad()
def cluster_maps(features: torch.Tensor, cam: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor | None = None,
                 num_clusters: int = 4, alpha: float = 0.5, iters: int = 10, seed: int | None = 0,
                 contribution: str = "masked", image: torch.Tensor | None = None,
                 classifier: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Pixel-wise cluster maps (see the module docstring).

    Args:
        features: ``(B, E, *spatial)`` pixel features; cam: ``(B, 1, *spatial)`` class activation map;
        positive: ``(B,)`` image-level labels (> 0.5: tumour); valid: ``(B, *spatial)`` pixels that may
            be clustered (e.g. the brain), default all.
        contribution: ``"masked"`` (re-classify ``image`` with each cluster masked out, through
            ``classifier``; only the tumour images are re-classified) or ``"cam_mean"`` (the CAM's mean
            over the cluster; ``image`` and ``classifier`` unused).
    Returns ``{"maps": (B, 1, *spatial) float 0/1, "labels": (B, N) cluster of each pixel (-1: not
    clustered), "contribution": (B, K) c_k (-inf for an empty cluster; 0 on tumour-free images with
    ``"masked"``), "drop": (B, K) the class score drop of masking the cluster (out of the input with
    ``"masked"``, out of the CAM with ``"cam_mean"``)}``.
    """
    from ..networks.kmeans import kmeans

    if contribution not in CONTRIBUTIONS:
        raise ValueError(f"contribution must be one of {list(CONTRIBUTIONS)}, got {contribution!r}")
    if contribution == "masked" and (image is None or classifier is None):
        raise ValueError("contribution='masked' re-classifies the image with each cluster masked out: "
                         "expected the image and the classifier")
    b = features.shape[0]
    spatial = features.shape[2:]
    f = F.normalize(features.detach().float().flatten(2).transpose(1, 2), dim=2)  # (B, N, E)
    n = f.shape[1]
    v = torch.ones(b, n, dtype=torch.bool, device=f.device) if valid is None else valid.reshape(b, n).bool()
    labels, _ = kmeans(f, num_clusters, iters=iters, seed=seed, valid=v)
    onehot = F.one_hot(labels.clamp(min=0), num_clusters).float() * (labels >= 0).unsqueeze(-1)  # (B, N, K)
    size = onehot.sum(1)
    pos = positive.reshape(b).to(labels.device) > 0.5
    if contribution == "cam_mean":
        m = cam.detach().float().reshape(b, n)
        drop = torch.einsum("bn,bnk->bk", m, onehot) / n
        per_cluster = drop * n / size.clamp(min=1)
    else:
        drop = torch.zeros(b, num_clusters, device=labels.device)
        if bool(pos.any()):
            drop[pos] = masked_contributions(classifier, image.detach()[pos], labels[pos], num_clusters).to(drop.device)
        per_cluster = drop
    contribution_k = torch.where(size > 0, per_cluster, torch.full_like(per_cluster, -float("inf")))
    best = contribution_k.max(1, keepdim=True).values
    chosen = (contribution_k >= alpha * best) & (contribution_k > 0) & pos.reshape(b, 1)
    maps = torch.einsum("bnk,bk->bn", onehot, chosen.float()).clamp(max=1.0)
    return {"maps": maps.reshape(b, 1, *spatial), "labels": labels, "contribution": contribution_k, "drop": drop}


class ClusterReSupervisionLoss(_Loss):
    """``DiceCE(seg_logits, cluster_maps(features, cam, image_label, valid, contribution, image, classifier))``
    (sigmoid); ``reduction`` applies to the Dice part per image (MONAI's ``DiceCELoss`` semantics).
    ``contribution``: ``"masked"`` (default: the drop of the classifier's tumour score when a cluster is
    masked out of the input image; ``forward`` then needs ``image`` and ``classifier``) or ``"cam_mean"``
    (the CAM's mean over the cluster)."""

    def __init__(self, num_clusters: int = 4, alpha: float = 0.5, iters: int = 10, seed: int | None = 0,
                 reduction: LossReduction | str = LossReduction.MEAN, feature_pixels: int | None = None,
                 contribution: str = "masked"):
        """``feature_pixels``: the number of pixel features of one training image (e.g. the crop size),
        to refuse an impossible ``num_clusters`` when the config is parsed rather than mid-training."""
        super().__init__(reduction=LossReduction(reduction).value)
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if feature_pixels is not None and num_clusters > feature_pixels:
            raise ValueError(f"K={num_clusters} exceeds the {feature_pixels} feature pixels of one training image "
                             "(num_clusters must be at most the number of pixels clustered)")
        if contribution not in CONTRIBUTIONS:
            raise ValueError(f"contribution must be one of {list(CONTRIBUTIONS)}, got {contribution!r}")
        self.num_clusters, self.alpha, self.iters, self.seed = int(num_clusters), float(alpha), int(iters), seed
        self.contribution = contribution
        self.dice_ce = DiceCELoss(sigmoid=True, reduction=self.reduction, smooth_nr=1e-5, smooth_dr=1e-5)
        self.last: dict = {}

    def forward(self, seg_logits: torch.Tensor, features: torch.Tensor, cam: torch.Tensor, image_label: torch.Tensor,
                valid: torch.Tensor | None = None, image: torch.Tensor | None = None,
                classifier: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        self.last = cluster_maps(features, cam, image_label, valid, self.num_clusters, self.alpha, self.iters, self.seed,
                                 self.contribution, image, classifier)
        return self.dice_ce(seg_logits, self.last["maps"].to(seg_logits.dtype))
