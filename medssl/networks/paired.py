"""Several single-modality networks behind one module (Semi-CML: one network per MR modality)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn


class PairedNetwork(nn.Module):
    """``networks`` (name -> network taking ONE input channel), applied channel by channel:
    ``forward(x)`` with ``x`` ``(B, len(networks), *spatial)`` (channel ``i`` = the input of the
    ``i``-th network, in the mapping's order) returns the networks' outputs concatenated on the
    channel axis, ``(B, sum of out_channels, *spatial)``.

    It is what trainers, evaluators and checkpoints see (state-dict keys ``networks.<name>.*``); the
    semi-supervised iterations (:mod:`medssl.engines.semi`) reach the members through
    ``.networks[name]``, and :meth:`member` picks one out for single-modality inference.
    """

    def __init__(self, networks: Mapping[str, nn.Module] | None = None, names: Sequence[str] | None = None,
                 factory: Callable[[], nn.Module] | None = None):
        super().__init__()
        if networks is None:  # one independently initialised network per name, e.g. from a MONAI
            # config entry with "_mode_": "callable"
            if not names or factory is None:
                raise ValueError("PairedNetwork needs networks, or names and a factory")
            networks = {name: factory() for name in names}
        if not networks:
            raise ValueError("PairedNetwork needs at least one network")
        self.networks = nn.ModuleDict(dict(networks))

    def optimizers(self, factory: Callable) -> dict:
        """One optimiser per member: ``{name: factory(member.parameters())}`` (``factory`` e.g. a
        config entry ``{"_target_": "torch.optim.Adam", "_mode_": "callable", "lr": ...}``)."""
        return {name: factory(net.parameters()) for name, net in self.networks.items()}

    @property
    def names(self) -> list[str]:
        return list(self.networks.keys())

    def member(self, name: str) -> nn.Module:
        if name not in self.networks:
            raise ValueError(f"no network {name!r}; expected one of {self.names}")
        return self.networks[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != len(self.networks):
            raise ValueError(f"expected {len(self.networks)} input channels ({', '.join(self.names)}), got {x.shape[1]}")
        return torch.cat([net(x[:, i : i + 1]) for i, net in enumerate(self.networks.values())], dim=1)


def distributed(network: PairedNetwork, device: torch.device) -> PairedNetwork:
    """``network`` for multi-GPU training (``torchrun``): each member moved to ``device`` and wrapped in
    its own ``DistributedDataParallel`` (``device_ids=[device]`` on CUDA, none on CPU/gloo), so every
    member's gradients are averaged over the ranks while the members keep their separate optimisers.
    Needs an initialised process group; the members' names and order are kept."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if torch.cuda.is_available() else None
    return PairedNetwork({m: DistributedDataParallel(n.to(device), device_ids=ids)
                          for m, n in network.networks.items()})
