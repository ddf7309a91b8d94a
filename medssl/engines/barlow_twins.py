"""Barlow Twins pretraining (Zbontar et al., ICML 2021) on MONAI's SupervisedTrainer.

``BarlowTwinsNet`` wraps any backbone with an ``encode(x)`` method (e.g. :class:`medssl.networks.DFRUNet`)
with global average pooling and a projector MLP; ``BarlowTwinsIteration`` is the trainer's
``iteration_update``: both augmented views go through the network and ``monai.losses.BarlowTwinsLoss``
compares their projections.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from monai.engines.utils import IterationEvents

from ..networks.heads import EncoderHead
from .iteration import autocast, optimise

logger = logging.getLogger(__name__)


class BarlowTwinsNet(EncoderHead):
    """``backbone.encode(x)`` -> global average pool -> projector (Linear-BN-ReLU ... Linear).

    Input ``(B, C, *spatial)`` -> projections ``(B, projector_dims[-1])``.
    """

    def __init__(self, backbone: nn.Module, in_features: int, projector_dims: Sequence[int] = (512, 512)):
        super().__init__(backbone, in_features, projector_dims)


def barlow_terms(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the Barlow Twins loss (Zbontar et al. 2021) for projections ``z1``, ``z2`` (N, D),
    normalised over the batch as MONAI's ``BarlowTwinsLoss`` does: the invariance term sum_i (1 - C_ii)^2 and
    the redundancy term sum_{i != j} C_ij^2 (before its weight lambda), C the cross-correlation matrix. For
    the pretext curves (no gradient): both fall when the pretext is learnt."""
    with torch.no_grad():
        z1, z2 = z1.float(), z2.float()
        n1 = (z1 - z1.mean(0)) / z1.std(0).add(1e-6)
        n2 = (z2 - z2.mean(0)) / z2.std(0).add(1e-6)
        c = n1.T @ n2 / z1.shape[0]
        diag = torch.diagonal(c)
        return ((1 - diag) ** 2).sum(), (c ** 2).sum() - (diag ** 2).sum()


def redundancy_floor(num_samples: int, dim: int) -> float:
    """The least redundancy term sum_{i != j} C_ij^2 that any projections of ``num_samples`` samples in ``dim``
    dimensions can reach when the invariance term is 0 (C_ii = 1 for all i): the batch-centred projections have
    rank r <= min(num_samples - 1, dim), so C does too, and ||C||_F^2 >= (tr C)^2 / r = dim^2 / r. It is 0
    only when ``dim <= num_samples - 1``; otherwise the cross-correlation can never reach the identity that
    the loss asks for (e.g. 16 samples, 512 dimensions: >= 16,964, i.e. at least 85 of loss with lambda
    5e-3, more than the invariance term can ever contribute)."""
    rank = max(1, min(int(num_samples) - 1, int(dim)))
    return float(dim) ** 2 / rank - float(dim)


class BarlowTwinsIteration:
    """``iteration_update`` of a ``SupervisedTrainer`` whose batches hold two views of each image.

    Args:
        keys: the batch keys of the two views.
        batch_size: the configured batch size (samples per step); Barlow Twins normalises over the batch, so
            < 2 is refused here, when the config is parsed, before anything trains.
        projector_dim: the projector's output size D, if given: D > batch_size - 1 is warned about (the
            cross-correlation then has rank < D and cannot reach the identity, :func:`redundancy_floor`).

    The output holds ``on_diagonal`` and ``off_diagonal`` (:func:`barlow_terms`) besides ``loss``, for
    :class:`medssl.engines.CurveLog`.
    """

    def __init__(self, keys: Sequence[str] = ("view1", "view2"), batch_size: int = 2, projector_dim: int | None = None):
        if int(batch_size) < 2:
            raise ValueError(f"Barlow Twins needs a batch size of at least 2 (it normalises each projection "
                             f"feature over the batch); got batch_size={batch_size}")
        if projector_dim is not None and int(projector_dim) > int(batch_size) - 1:
            logger.warning("Barlow Twins with %d samples per step and a %d-d projector: the cross-correlation has "
                           "rank <= %d and cannot reach the identity (off-diagonal term >= %.0f); use at most %d "
                           "projector dimensions or more samples per step", int(batch_size), int(projector_dim),
                           int(batch_size) - 1, redundancy_floor(batch_size, projector_dim), int(batch_size) - 1)
        self.keys = tuple(keys)

    def __call__(self, engine, batchdata: dict) -> dict:
        v1, v2 = (batchdata[k].to(engine.state.device) for k in self.keys)
        if v1.shape[0] < 2:
            raise ValueError(f"Barlow Twins got a batch of {v1.shape[0]} image(s); it needs at least 2 "
                             f"(set drop_last=True in the DataLoader)")
        out = engine.state.output = {}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine):
            out["pred"], out["label"] = engine.network(v1), engine.network(v2)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            out["loss"] = engine.loss_function(out["pred"], out["label"])
        out["on_diagonal"], out["off_diagonal"] = barlow_terms(out["pred"], out["label"])
        return optimise(engine, out)
