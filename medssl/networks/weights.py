"""Loading pretrained weights into a network, with a clear error for a checkpoint of another network."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the network it is loaded into."""


def _state_dict(obj, path) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("network", "model", "state_dict", "net"):
        if isinstance(obj, dict) and key in obj:
            return _state_dict(obj[key], path)
    raise CheckpointMismatchError(f"{path}: no network state dict found; expected a state dict or a dict with a "
                                  f"'network' or 'model' entry")


def _head_keys(network: nn.Module) -> set[str]:
    """Parameter names of the last module that owns parameters (the output head)."""
    last = None
    for name, module in network.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        return set()
    prefix = f"{last}." if last else ""
    return {f"{prefix}{k}" for k, _ in network.get_submodule(last).named_parameters(recurse=False)}


PRETRAINED = "a pretrained checkpoint (run the pretrain stage first, or set init to 'baseline')"
TRAINED = ("a trained model (run the train stage into this --ckpt_dir first, or give --ckpt_dir of a finished "
           "training run)")


def load_pretrained(network: nn.Module, checkpoint: str | os.PathLike, allow_head_mismatch: bool = True,
                    expected: str = PRETRAINED) -> nn.Module:
    """Load ``checkpoint`` into ``network``; only the output head may differ in shape (it is then kept fresh).

    Raises :class:`CheckpointMismatchError` naming the file when the checkpoint is missing, or its
    parameter names or shapes do not match the network beyond the head (a checkpoint of another
    network, another input channel count or other spatial dims). ``expected``: what the missing-file message
    says the file should be and how to get it (:data:`PRETRAINED`, or :data:`TRAINED` for evaluation and
    inference).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointMismatchError(f"{path}: missing; expected {expected}")
    try:
        state = _state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    except CheckpointMismatchError:
        raise
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: unreadable checkpoint ({e}); expected a torch state dict") from None
    own = network.state_dict()
    head = _head_keys(network) if allow_head_mismatch else set()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape and k not in head)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} parameters missing (e.g. {missing[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} with other shapes (e.g. {k}: checkpoint {tuple(state[k].shape)}, "
                          f"network {tuple(own[k].shape)})")
        from ..bundles import trained_with

        given = trained_with(path.parent)
        hint = (f"; {path.parent / 'run.json'} says it was trained with {given}: give the same settings, or run "
                f"`medssl run BUNDLE evaluate|inference --ckpt_dir {path.parent}`, which applies them") if given else ""
        raise CheckpointMismatchError(f"{path}: checkpoint of another network; expected the parameters of "
                                      f"{type(network).__name__} ({len(own)} tensors): " + "; ".join(detail) + hint)
    load = {k: v for k, v in state.items() if own[k].shape == v.shape}
    network.load_state_dict(load, strict=False)
    return network


def initialise(network: nn.Module, init: str = "method", checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """``init="method"``: load the pretrained ``checkpoint``; ``"baseline"``: keep the random initialisation."""
    if init == "baseline":
        return network
    if init == "method":
        if not checkpoint:
            raise CheckpointMismatchError("init='method' needs a pretrained checkpoint path")
        return load_pretrained(network, checkpoint)
    raise ValueError(f"init must be 'method' or 'baseline', got {init!r}")
