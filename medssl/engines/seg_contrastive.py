"""Supervised segmentation step with an auxiliary pixel-embedding loss, as a SupervisedTrainer
``iteration_update`` (dfr_barlow fine-tuning: Dice + CE on the logits, lesion-aware contrastive loss
on the last decoder features)."""

from __future__ import annotations

import torch
from torch import nn

from monai.engines.utils import IterationEvents

from .handlers import _unwrap
from .iteration import autocast, optimise


class SegContrastiveIteration:
    """``loss = engine.loss_function(logits, label) + weight * embedding_loss(embedding, label)``.

    The network must provide ``forward_features(x) -> (logits, embedding)`` (e.g.
    :class:`medssl.networks.DFRUNet`; a DDP wrapper is looked through). ``weight=0`` leaves the plain
    supervised loss, the ablation without the auxiliary term. The label is ``(B, 1, *spatial)`` with
    class indices; lesion = label > 0 for the embedding loss.
    """

    def __init__(self, embedding_loss: nn.Module, weight: float = 0.1):
        self.embedding_loss = embedding_loss
        self.weight = float(weight)

    def __call__(self, engine, batchdata: dict) -> dict:
        device = engine.state.device
        image, label = batchdata["image"].to(device), batchdata["label"].to(device)
        net = engine.network
        features = _unwrap(net).forward_features
        out = engine.state.output = {"image": image, "label": label}
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine):
            logits, embedding = features(image)
            out["pred"] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            seg = engine.loss_function(logits, label)
            aux = self.embedding_loss(embedding, label) if self.weight else torch.zeros((), device=device)
            out.update(loss=seg + self.weight * aux, seg_loss=seg, embedding_loss=aux)
        return optimise(engine, out)
