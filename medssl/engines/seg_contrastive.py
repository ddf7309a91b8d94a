"""Supervised segmentation step with an auxiliary pixel-embedding loss, as a SupervisedTrainer
``iteration_update`` (dfr_barlow fine-tuning: Dice + CE on the logits, lesion-aware contrastive loss
on the last decoder features)."""

from __future__ import annotations

import torch
from torch import nn

from monai.engines.utils import IterationEvents


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
        device = engine.state.device if hasattr(engine.state, "device") else engine.device
        image, label = batchdata["image"].to(device), batchdata["label"].to(device)
        net = engine.network
        features = (net.module if hasattr(net, "module") else net).forward_features
        # engine.state.output is filled before the events fire, as in MONAI's own _iteration: handlers
        # (and the decollation on MODEL_COMPLETED) read it there
        out = engine.state.output = {"image": image, "label": label}
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        logits, embedding = features(image)
        out["pred"] = logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        seg = engine.loss_function(logits, label)
        aux = self.embedding_loss(embedding, label) if self.weight else torch.zeros((), device=device)
        out["loss"] = seg + self.weight * aux
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        out["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        out.update(loss=out["loss"].detach(), pred=logits.detach(), seg_loss=seg.detach(), embedding_loss=aux.detach())
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
