"""The optimisation tail shared by medssl's ``iteration_update`` functions for MONAI's SupervisedTrainer."""

from __future__ import annotations

import torch

from monai.engines.utils import IterationEvents


def optimise(engine, out: dict, optimizers=None) -> dict:
    """Given ``engine.state.output`` (``out``) holding the iteration's ``loss`` after the forward pass,
    fire the events MONAI's own ``_iteration`` fires (handlers and the output decollation read
    ``engine.state.output`` there), back-propagate, step the optimiser(s) (``optimizers``, default
    ``[engine.optimizer]``) and detach every tensor of ``out``; returns the (decollated)
    ``engine.state.output``."""
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    out["loss"].backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    for optimizer in optimizers or [engine.optimizer]:
        optimizer.step()
    out.update({k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)})
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output  # decollated by MONAI on MODEL_COMPLETED; ignite stores what is returned
