"""The optimisation tail shared by medssl's ``iteration_update`` functions for MONAI's SupervisedTrainer."""

from __future__ import annotations

import contextlib

import torch

from monai.engines.utils import IterationEvents


def autocast(engine):
    """The mixed-precision context of the forward pass, as MONAI's ``SupervisedTrainer`` enters it when its
    ``amp`` is true (``torch.autocast`` with the trainer's ``amp_kwargs``), on the engine's device type (so
    CPU autocast, bfloat16, works too); a no-op when ``amp`` is false."""
    if not getattr(engine, "amp", False):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(engine.state.device).type, **(getattr(engine, "amp_kwargs", None) or {}))


def optimise(engine, out: dict, optimizers=None) -> dict:
    """Given ``engine.state.output`` (``out``) holding the iteration's ``loss`` after the forward pass,
    fire the events MONAI's own ``_iteration`` fires (handlers and the output decollation read
    ``engine.state.output`` there), back-propagate, step the optimiser(s) (``optimizers``, default
    ``[engine.optimizer]``) and detach every tensor of ``out``; returns the (decollated)
    ``engine.state.output``. With ``amp``, through the trainer's ``GradScaler`` as MONAI does."""
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    scaler = getattr(engine, "scaler", None) if getattr(engine, "amp", False) else None
    (scaler.scale(out["loss"]) if scaler is not None else out["loss"]).backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    for optimizer in optimizers or [engine.optimizer]:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    out.update({k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)})
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output  # decollated by MONAI on MODEL_COMPLETED; ignite stores what is returned
