"""Lesion-aware pixel contrastive loss (the fine-tuning loss of Zhang et al., Applied Intelligence
55(13), 2025, doi:10.1007/s10489-025-06737-2, as interpreted here).

The paper separates lesion from background pixel embeddings and gives small lesions their due weight.
Formula used (supervised contrastive loss of Khosla et al., NeurIPS 2020, over sampled pixels):

    L = 1/|A| * sum_{i in A} -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A, a != i} exp(z_i.z_a / t) )

with z the L2-normalised pixel embeddings, t the temperature, A the anchors sampled from the batch and
P(i) the anchors with the same class as i (lesion or background). Lesion-awareness is in how A is drawn,
per image:
- ``num_samples / 2`` lesion pixels, each lesion (connected component) drawn with equal total
  probability, i.e. a pixel of component c with probability proportional to 1 / area(c)
  (``size_power=1``; 0 gives plain uniform sampling). A 5-pixel lesion is then represented as often as a
  5000-pixel one, instead of being swamped by it;
- ``num_samples / 2`` background pixels, half of them from a ``boundary`` -pixel band around the
  lesions (the hard negatives that become false positives) and half from the rest of the background.
Images without lesion contribute background anchors only; a batch without any lesion gives 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai.utils import LossReduction


def _component_weights(mask: np.ndarray, size_power: float) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.float64)
    areas = np.bincount(labels.ravel())[1:].astype(np.float64)
    w = np.concatenate([[0.0], areas ** (-size_power)])
    return w[labels]


class LesionAwareContrastiveLoss(_Loss):
    """See the module docstring for the formula.

    Args:
        temperature: t.
        num_samples: anchors drawn per image (half lesion, half background).
        size_power: lesion pixels are drawn with probability proportional to area(component) ** -size_power.
        boundary: width in pixels/voxels of the background band around lesions.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-anchor losses).

    ``forward(embedding, target)``: ``embedding`` ``(B, C, *spatial)``, ``target`` ``(B, 1, *spatial)`` or
    ``(B, *spatial)``, lesion where ``target > 0``. 2D and 3D alike.
    """

    def __init__(self, temperature: float = 0.1, num_samples: int = 256, size_power: float = 1.0, boundary: int = 3,
                 reduction: LossReduction | str = LossReduction.MEAN):
        super().__init__(reduction=LossReduction(reduction).value)
        self.temperature = temperature
        self.num_samples = num_samples
        self.size_power = size_power
        self.boundary = boundary

    def _band(self, lesion: torch.Tensor) -> torch.Tensor:
        k = 2 * self.boundary + 1
        pool = F.max_pool2d if lesion.ndim == 3 else F.max_pool3d
        grown = pool(lesion[:, None].float(), k, stride=1, padding=self.boundary)[:, 0] > 0
        return grown & ~lesion

    def sample(self, lesion: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image of the boolean ``(B, *spatial)`` lesion mask, (flat pixel indices, labels 1 lesion /
        0 background) of its anchors."""
        band = self._band(lesion)
        half = self.num_samples // 2
        out = []
        for b in range(lesion.shape[0]):
            les = lesion[b].reshape(-1)
            idx, lab = [], []
            if les.any():
                w = torch.as_tensor(_component_weights(lesion[b].cpu().numpy(), self.size_power).ravel(),
                                    device=lesion.device)
                idx.append(torch.multinomial(w, half, replacement=True))
                lab.append(torch.ones(half, dtype=torch.long, device=lesion.device))
            bg = ~les
            if bg.any():
                near = band[b].reshape(-1)
                far = bg & ~near
                w = near.double() * (0.5 / max(int(near.sum()), 1)) + far.double() * (0.5 / max(int(far.sum()), 1))
                idx.append(torch.multinomial(w, half, replacement=True))
                lab.append(torch.zeros(half, dtype=torch.long, device=lesion.device))
            out.append((torch.cat(idx), torch.cat(lab)))
        return out

    def forward(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == embedding.ndim:
            if target.shape[1] != 1:
                raise ValueError(f"target must have one channel, got shape {tuple(target.shape)}")
            target = target[:, 0]
        if target.shape != (embedding.shape[0], *embedding.shape[2:]):
            raise ValueError(f"target shape {tuple(target.shape)} does not match embedding {tuple(embedding.shape)}")
        flat = embedding.reshape(embedding.shape[0], embedding.shape[1], -1)
        z, y = [], []
        for b, (idx, lab) in enumerate(self.sample(target > 0)):
            z.append(flat[b][:, idx].t())
            y.append(lab)
        z = F.normalize(torch.cat(z), dim=1)
        y = torch.cat(y)
        if not (y == 1).any() or not (y == 0).any():
            return embedding.sum() * 0.0
        logits = z @ z.t() / self.temperature
        self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (y[:, None] == y[None, :]) & ~self_mask
        per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / pos.sum(1).clamp(min=1)
        if self.reduction == LossReduction.MEAN.value:
            return per_anchor.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_anchor.sum()
        return per_anchor
