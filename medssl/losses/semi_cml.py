"""Losses of Semi-CML (Zhang et al., "Multi-modal contrastive mutual learning and pseudo-label re-learning
for semi-supervised medical image segmentation", Medical Image Analysis 83:102656, 2023, as interpreted here).

Two segmentation networks A and B, one per MR modality (e.g. FLAIR and T2), see the same spatial crop of the
same N cases and each output logits ``(N, C, *spatial)`` (2D or 3D). Both losses take logits and turn them
into soft predictions p: ``sigmoid=True`` applies a sigmoid per channel, ``sigmoid=False`` a softmax over the
channels.

Area-similarity contrastive loss (``AreaSimilarityContrastiveLoss``). The predictions of a crop are compared
through their predicted areas rather than voxel by voxel. For crop i and network m in {A, B}, the soft
foreground p (without channel 0 when ``include_background=False``) is average-pooled
(``adaptive_avg_pool2d/3d``) onto ``grid`` cells per spatial axis, and the ``C' * grid ** D`` cell values
(C' kept channels, D spatial dimensions) are flattened into the area vector a_i^m: the fraction of each cell
predicted as foreground. With eps a small constant added to every component, so that an all-background
prediction still has a direction (the uniform one) and a finite similarity, z_i^m = (a_i^m + eps) / |a_i^m + eps|
and

    s(i, k) = <z_i^A, z_k^B> / t

with t the temperature. The positive of crop i is (i, i), the two modalities' predictions of the same crop.
Its negatives are the keys k **of other cases** (``case_ids``; crops of one case are never negatives of each
other, whatever their position): the other crops of the batch and, with ``queue_size > 0``, a memory bank
(MoCo-style FIFO queue, He et al. CVPR 2020) of the detached area vectors of the last ``queue_size`` crops of
earlier calls, each stored with its case id. So a step with few crops from few cases still contrasts each crop
with many other cases. The loss of crop i is the symmetric InfoNCE over its positive and its negatives N(i):

    L_i = 1/2 [ -log( exp(s(i,i)) / (exp(s(i,i)) + sum_{k in N(i)} exp(s(i,k))) )
              - log( exp(s'(i,i)) / (exp(s'(i,i)) + sum_{k in N(i)} exp(s'(i,k))) ) ]

with s' the same similarity from B to A (anchor z_i^B, keys z_k^A). A crop with fewer than ``min_negatives``
negatives (an empty queue at the start of training, a batch of one case) is left out: its L_i is 0 and
"mean" averages over the crops kept (``last_negatives`` holds the count per crop of the last call, for logs and
tests). ``reduction`` "mean" / "sum" / "none" averages (over the kept crops), sums or returns the N values;
with no crop kept the loss is a 0 carrying a ``grad_fn`` of both inputs. Gradients reach both networks through
the batch's vectors (the queue is detached). Without ``case_ids`` every crop of the batch is taken as its own
case and no queue is used (``queue_size > 0`` then needs ``case_ids``).

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
        queue_size: length of the memory bank of earlier crops' area vectors (0: the batch's crops only).
        min_negatives: a crop with fewer negatives (keys of other cases) is left out of the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-crop losses, shape ``(N,)``).

    ``forward(logits_a, logits_b, case_ids=None)``: the two networks' logits ``(N, C, *spatial)``, 2D or 3D,
    of the same N crops in the same order, and the case of each crop (N strings or ints). In training mode
    (``train()``, the default) each call then appends the batch's detached vectors to the queue. The queue
    and the case-id table are part of ``state_dict`` (a resumed run continues them).
    """

    def __init__(self, grid: int = 4, temperature: float = 0.1, sigmoid: bool = True, include_background: bool = True,
                 eps: float = 1e-6, queue_size: int = 0, min_negatives: int = 1,
                 reduction: LossReduction | str = LossReduction.MEAN):
        super().__init__(reduction=LossReduction(reduction).value)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if queue_size < 0 or min_negatives < 0:
            raise ValueError(f"queue_size and min_negatives must be >= 0, got {queue_size}, {min_negatives}")
        self.grid = grid
        self.temperature = temperature
        self.sigmoid = sigmoid
        self.include_background = include_background
        self.eps = eps
        self.queue_size = int(queue_size)
        self.min_negatives = int(min_negatives)
        self._case_index: dict[str, int] = {}
        self.queue_a: torch.Tensor | None = None  # (queue_size, D) unit vectors of network A, filled from row 0
        self.queue_b: torch.Tensor | None = None
        self.queue_ids: torch.Tensor | None = None  # (queue_size,) case index, -1 for an empty slot
        self.queue_ptr = 0
        self.last_negatives: torch.Tensor | None = None

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

    def _unit(self, logits: torch.Tensor) -> torch.Tensor:
        areas = self.area_vectors(logits)
        areas = areas.as_tensor() if hasattr(areas, "as_tensor") else areas  # a MetaTensor's batch metadata is not theirs
        return F.normalize(areas.float() + self.eps, dim=1)

    def similarity(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """The ``(N, N)`` matrix of the batch, ``S[i, j] = cos(a_i^A + eps, a_j^B + eps) / t``."""
        _check_pair(logits_a, logits_b)
        return self._unit(logits_a) @ self._unit(logits_b).t() / self.temperature

    def case_index(self, case_ids, n: int, device=None) -> torch.Tensor:
        """``(n,)`` integer index of each crop's case (a fixed index per case id, kept across calls); without
        ``case_ids``, ``0..n-1`` offset past every known case (each crop its own case)."""
        if case_ids is None:
            return torch.arange(n, device=device) + len(self._case_index)
        if isinstance(case_ids, torch.Tensor):
            case_ids = case_ids.reshape(-1).tolist()
        case_ids = [case_ids] if isinstance(case_ids, (str, int)) else list(case_ids)
        if len(case_ids) != n:
            raise ValueError(f"{len(case_ids)} case ids for {n} crops; expected one case id per crop")
        return torch.as_tensor([self._case_index.setdefault(str(c), len(self._case_index)) for c in case_ids],
                               dtype=torch.long, device=device)

    def keys(self, za: torch.Tensor, zb: torch.Tensor, ids: torch.Tensor, use_queue: bool):
        """The batch's vectors followed by the queue's: ``(keys of A, keys of B, their case index)``."""
        if not use_queue or self.queue_ids is None:
            return za, zb, ids
        if self.queue_a.shape[1] != za.shape[1]:
            raise ValueError(f"area vectors of length {za.shape[1]}, but the queue holds vectors of length "
                             f"{self.queue_a.shape[1]}; expected the same grid, channels and spatial dimensions")
        qa, qb, qi = (q.to(za.device) for q in (self.queue_a, self.queue_b, self.queue_ids))
        return torch.cat([za, qa.to(za.dtype)]), torch.cat([zb, qb.to(zb.dtype)]), torch.cat([ids, qi])

    def negative_mask(self, ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` True where key k is a negative of crop i: a filled key of another case."""
        return (ids[:, None] != key_ids[None, :]) & (key_ids[None, :] >= 0)

    @torch.no_grad()
    def _enqueue(self, za: torch.Tensor, zb: torch.Tensor, ids: torch.Tensor) -> None:
        if self.queue_ids is None:
            self.queue_a = za.new_zeros(self.queue_size, za.shape[1])
            self.queue_b = za.new_zeros(self.queue_size, za.shape[1])
            self.queue_ids = torch.full((self.queue_size,), -1, dtype=torch.long, device=za.device)
        za, zb, ids = za[-self.queue_size:], zb[-self.queue_size:], ids[-self.queue_size:]
        rows = (self.queue_ptr + torch.arange(len(ids), device=self.queue_ids.device)) % self.queue_size
        self.queue_a[rows] = za.detach().to(self.queue_a)
        self.queue_b[rows] = zb.detach().to(self.queue_b)
        self.queue_ids[rows] = ids.to(self.queue_ids.device)
        self.queue_ptr = int((self.queue_ptr + len(ids)) % self.queue_size)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor, case_ids=None) -> torch.Tensor:
        _check_pair(logits_a, logits_b)
        if self.queue_size and case_ids is None:
            raise ValueError("a queue of earlier crops needs the case id of every crop (case_ids); without them "
                             "crops of the same case could be negatives of each other")
        za, zb = self._unit(logits_a), self._unit(logits_b)
        n = za.shape[0]
        ids = self.case_index(case_ids, n, za.device)
        use_queue = self.queue_size > 0
        keys_a, keys_b, key_ids = self.keys(za, zb, ids, use_queue)
        negative = self.negative_mask(ids, key_ids)
        positive = torch.zeros_like(negative)
        positive[:, :n] = torch.eye(n, dtype=torch.bool, device=za.device)
        candidates = positive | negative
        target = torch.arange(n, device=za.device)
        s_ab = (za @ keys_b.t() / self.temperature).masked_fill(~candidates, float("-inf"))
        s_ba = (zb @ keys_a.t() / self.temperature).masked_fill(~candidates, float("-inf"))
        per_case = 0.5 * (F.cross_entropy(s_ab, target, reduction="none") + F.cross_entropy(s_ba, target, reduction="none"))
        self.last_negatives = negative.sum(1).detach()
        kept = self.last_negatives >= max(self.min_negatives, 1)
        per_case = per_case * kept.to(per_case.dtype)  # left out: 0, still attached to both inputs
        if use_queue and self.training:
            self._enqueue(za, zb, ids)
        if self.reduction == LossReduction.MEAN.value:
            return per_case.sum() / kept.sum().clamp(min=1)
        return _reduce(per_case, self.reduction)

    def get_extra_state(self) -> dict:
        return {"case_index": dict(self._case_index), "queue_a": self.queue_a, "queue_b": self.queue_b,
                "queue_ids": self.queue_ids, "queue_ptr": self.queue_ptr}

    def set_extra_state(self, state: dict) -> None:
        self._case_index = dict(state.get("case_index", {}))
        self.queue_a, self.queue_b, self.queue_ids = (None if state.get(k) is None else state[k].clone()
                                                      for k in ("queue_a", "queue_b", "queue_ids"))
        self.queue_ptr = int(state.get("queue_ptr", 0))
        if self.queue_ids is not None and self.queue_ids.shape[0] != self.queue_size:
            raise ValueError(f"the saved queue holds {self.queue_ids.shape[0]} entries; this loss has queue_size="
                             f"{self.queue_size}")


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
