"""Losses of Semi-CML (Zhang et al., "Multi-modal contrastive mutual learning and pseudo-label re-learning
for semi-supervised medical image segmentation", Medical Image Analysis 83:102656, 2023, as interpreted here).

Two segmentation networks A and B, one per MR modality (e.g. FLAIR and T2), see the same spatial crop of the
same N cases and each output logits ``(N, C, *spatial)`` (2D or 3D). Both losses take logits and turn them
into soft predictions p: ``sigmoid=True`` applies a sigmoid per channel, ``sigmoid=False`` a softmax over the
channels.

Area-similarity contrastive loss (``AreaSimilarityContrastiveLoss``). The predictions of a case are compared
through their predicted areas rather than voxel by voxel. For case i and network m in {A, B}, the soft
foreground p (without channel 0 when ``include_background=False``) is average-pooled
(``adaptive_avg_pool2d/3d``) onto ``grid`` cells per spatial axis, and the ``C' * grid ** D`` cell values
(C' kept channels, D spatial dimensions) are flattened into the area vector a_i^m: the fraction of each cell
predicted as foreground. With eps a small constant added to every component, so that an all-background
prediction still has a direction (the uniform one) and a finite similarity,

    s_ij = cos(a_i^A + eps, a_j^B + eps) / t

with t the temperature. The positive of case i is the pair (i, i), the two modalities' predictions of the
same case; its negatives are the pairs (i, j != i), predictions of different cases. The loss of case i is
the symmetric InfoNCE (CLIP-style) over the N x N matrix S = (s_ij):

    L_i = 1/2 [ -log( exp(s_ii) / sum_j exp(s_ij) ) - log( exp(s_ii) / sum_j exp(s_ji) ) ]

i.e. ``1/2 [CE(S, arange(N)) + CE(S^T, arange(N))]`` per case; ``reduction`` "mean" / "sum" / "none"
averages, sums or returns the N values. With N = 1 there are no negatives and the loss is 0 (a zero
carrying a ``grad_fn`` of both inputs, so ``backward`` still works). Gradients reach both networks.

Mutual-learning loss (``MutualLearningLoss``). Each network's detached soft prediction is the target of the
other:

    L = mse(p_A, sg(p_B)) + mse(p_B, sg(p_A))

with sg the stop-gradient (``detach``) and mse the mean squared difference over channels and voxels,
computed per case (all channels, the background too, in softmax mode). The value equals 2 mse(p_A, p_B),
but the gradient of the first term reaches network A only and that of the second network B only.
``reduction`` "mean" / "sum" / "none" averages, sums or returns the per-case values.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai.utils import LossReduction


def _probabilities(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)


def _check_pair(logits_a: torch.Tensor, logits_b: torch.Tensor) -> None:
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"the two predictions differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    if logits_a.ndim < 3:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits_a.shape)}")


def _reduce(per_case: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return per_case.mean()
    if reduction == LossReduction.SUM.value:
        return per_case.sum()
    return per_case


class AreaSimilarityContrastiveLoss(_Loss):
    """See the module docstring for the formula.

    Args:
        grid: cells per spatial axis of the area vectors (``grid ** D`` cells per kept channel).
        temperature: t.
        sigmoid: sigmoid per channel if True, else softmax over the channels.
        include_background: if False, channel 0 is background and left out of the area vectors (ignored,
            with a warning, for single-channel logits).
        eps: constant added to every area before the cosine similarity.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-case losses, shape ``(N,)``).

    ``forward(logits_a, logits_b)``: the two networks' logits ``(N, C, *spatial)``, 2D or 3D, of the same N
    cases in the same order.
    """

    def __init__(self, grid: int = 4, temperature: float = 0.1, sigmoid: bool = True, include_background: bool = True,
                 eps: float = 1e-6, reduction: LossReduction | str = LossReduction.MEAN):
        super().__init__(reduction=LossReduction(reduction).value)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.grid = grid
        self.temperature = temperature
        self.sigmoid = sigmoid
        self.include_background = include_background
        self.eps = eps

    def area_vectors(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, C' * grid ** D)`` fractions of each grid cell predicted as foreground."""
        if logits.ndim not in (4, 5):
            raise ValueError(f"logits must be (N, C, H, W) or (N, C, H, W, D), got shape {tuple(logits.shape)}")
        p = _probabilities(logits, self.sigmoid)
        if not self.include_background:
            if p.shape[1] == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.")
            else:
                p = p[:, 1:]
        pool = F.adaptive_avg_pool2d if p.ndim == 4 else F.adaptive_avg_pool3d
        return pool(p, self.grid).reshape(p.shape[0], -1)

    def similarity(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """The ``(N, N)`` matrix S, ``S[i, j] = cos(a_i^A + eps, a_j^B + eps) / t``."""
        _check_pair(logits_a, logits_b)
        za = F.normalize(self.area_vectors(logits_a) + self.eps, dim=1)
        zb = F.normalize(self.area_vectors(logits_b) + self.eps, dim=1)
        return za @ zb.t() / self.temperature

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        s = self.similarity(logits_a, logits_b)
        n = s.shape[0]
        if n == 1:
            per_case = s.reshape(1) * 0.0  # no negatives: 0, still attached to both inputs
        else:
            target = torch.arange(n, device=s.device)
            per_case = 0.5 * (F.cross_entropy(s, target, reduction="none")
                              + F.cross_entropy(s.t(), target, reduction="none"))
        return _reduce(per_case, self.reduction)


class MutualLearningLoss(_Loss):
    """See the module docstring for the formula.

    Args:
        sigmoid: sigmoid per channel if True, else softmax over the channels (all channels compared).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-case losses, shape ``(N,)``).

    ``forward(logits_a, logits_b)`` gives ``mse(p_A, sg(p_B)) + mse(p_B, sg(p_A))``; ``halves`` gives the
    two terms apart (the first trains network A, the second network B).
    """

    def __init__(self, sigmoid: bool = True, reduction: LossReduction | str = LossReduction.MEAN):
        super().__init__(reduction=LossReduction(reduction).value)
        self.sigmoid = sigmoid

    def _per_case(self, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (p - target).pow(2).reshape(p.shape[0], -1).mean(1)

    def halves(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mse(p_A, sg(p_B)), mse(p_B, sg(p_A)))``, each reduced as ``reduction`` says."""
        _check_pair(logits_a, logits_b)
        pa = _probabilities(logits_a, self.sigmoid)
        pb = _probabilities(logits_b, self.sigmoid)
        return (_reduce(self._per_case(pa, pb.detach()), self.reduction),
                _reduce(self._per_case(pb, pa.detach()), self.reduction))

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        la, lb = self.halves(logits_a, logits_b)
        return la + lb
