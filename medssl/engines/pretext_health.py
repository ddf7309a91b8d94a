"""Pretext health: does a pretraining beat the trivial solution of its pretext on held-out crops?

A self-supervised pretraining says something about its method only if the network learned more than a
rule that needs no learning: returning the corrupted input unchanged (restoration), guessing (a
classification's chance) or a shortcut that reads the answer off intensity statistics. :class:`PretextHealth`
measures, when a pretraining completes, its pretext metric on held-out crops of the validation cases (never
test cases) beside that trivial answer, and writes them to a JSON file that ``medssl benchmark`` collects
(``results.json`` ``pretext_health``) and uses to label a verdict whose pretraining did not learn.

A *measure* is a callable ``measure(network, batches, fit_batches) -> dict`` returning at least
``{"metric": name, "value": x, "trivial": y, "trivial_rule": name, "learned": bool}`` (plus any extras);
``batches`` are collated batches of held-out crops made by the pretraining's own random transforms (seeded,
so every run measures the same crops), ``fit_batches`` the same from training cases (for probes that must be
fitted). :func:`restoration_health` is the measure of a restoration pretext.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from monai.data import Dataset, list_data_collate
from monai.transforms import Randomizable
from monai.utils import min_version, optional_import

from ..utils import atomic_write_json
from .handlers import _unwrap

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)


def held_out_batches(data: Sequence[dict], transform, num_crops: int, batch_size: int = 2, seed: int = 0) -> list[dict]:
    """Collated batches of at most ``num_crops`` crops of ``data`` made by a copy of ``transform`` seeded with
    ``seed`` (the training transform's own state is left alone), cycling over the cases in order until enough
    crops are drawn."""
    transform = copy.deepcopy(transform)
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=seed)
    items: list[dict] = []
    ds = Dataset(list(data), transform)
    while len(items) < num_crops and len(ds):
        for i in range(len(ds)):
            out = ds[i]
            items.extend(out if isinstance(out, list) else [out])
            if len(items) >= num_crops:
                break
    items = items[:num_crops]
    return [list_data_collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


class PretextHealth:
    """Attach to a pretraining's trainer: at its completion, measure ``measure`` (see the module) on
    ``num_crops`` held-out crops of ``data`` (the validation cases) drawn by ``transform`` (the pretraining's
    preprocessing, seeded by ``seed``) and write the result to ``output_file`` (JSON, atomically), with the
    number of crops and cases. ``fit_data`` (training cases; optional) gives ``fit_batches`` for a measure that
    fits a probe. With no held-out case the file says so (``"skipped"``) instead of a number.

    The network is put in eval mode for the measure and back in its previous mode afterwards."""

    def __init__(self, network: torch.nn.Module, data: Sequence[dict], transform, measure: Callable, output_file: str,
                 num_crops: int = 16, batch_size: int = 2, seed: int = 0, fit_data: Sequence[dict] | None = None,
                 num_fit_crops: int = 64, device=None):
        self.network = network
        self.data = list(data or [])
        self.transform = transform
        self.measure = measure
        self.output_file = Path(output_file)
        self.num_crops, self.batch_size, self.seed = int(num_crops), int(batch_size), int(seed)
        self.fit_data = list(fit_data or [])
        self.num_fit_crops = int(num_fit_crops)
        self.device = device

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> dict:
        if not self.data:
            result = {"skipped": "no validation case to hold out: the datalist's 'validation' is empty"}
            logger.warning("pretext health not measured: %s", result["skipped"])
            atomic_write_json(result, self.output_file)
            return result
        batches = held_out_batches(self.data, self.transform, self.num_crops, self.batch_size, self.seed)
        fit = held_out_batches(self.fit_data, self.transform, self.num_fit_crops, self.batch_size, self.seed + 1) \
            if self.fit_data else []
        net = _unwrap(self.network)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                result = dict(self.measure(net, batches, fit))
        finally:
            net.train(was_training)
        result.update(crops=sum(len(next(iter(b.values()))) for b in batches), cases=len(self.data))
        atomic_write_json(result, self.output_file)
        logger.info("pretext health on %d held-out crops: %s %.4g vs %.4g (%s): %s", result["crops"], result["metric"],
                    result["value"], result["trivial"], result["trivial_rule"],
                    "learned" if result["learned"] else "NOT learned")
        return result


def _device(network: torch.nn.Module) -> torch.device:
    return next(network.parameters()).device


def restoration_health(network, batches, fit_batches=None, input_key: str = "image", target_key: str = "label",
                       max_ratio: float = 0.9) -> dict:
    """The restoration pretext (context restoration, Chen et al. 2019): the L2 error (MSE) of the network's
    restoration of the corrupted ``input_key`` against the original ``target_key``, beside the MSE of the
    identity (the corrupted input returned unchanged), over all voxels and over the corrupted ones (where input
    and target differ in any channel). ``learned``: the network's MSE is below ``max_ratio`` x the identity's
    (default 0.9: it removes at least a tenth of the identity's error, not just a rounding's worth)."""
    dev = _device(network)
    sums = torch.zeros(4, dtype=torch.float64)  # network, identity (all voxels); network, identity (corrupted)
    n_all = n_bad = 0
    for b in batches:
        x, y = torch.as_tensor(b[input_key]).to(dev).float(), torch.as_tensor(b[target_key]).to(dev).float()
        p = network(x).float()
        err, ident = (p - y) ** 2, (x - y) ** 2
        bad = (x != y).any(1, keepdim=True).expand_as(x)
        sums += torch.stack([err.sum(), ident.sum(), err[bad].sum(), ident[bad].sum()]).double().cpu()
        n_all += x.numel()
        n_bad += int(bad.sum())
    value, trivial = float(sums[0] / n_all), float(sums[1] / n_all)
    return {"metric": "restoration_mse", "value": value, "trivial": trivial, "trivial_rule": "identity",
            "ratio": value / trivial if trivial > 0 else float("nan"),
            "corrupted_value": float(sums[2] / max(n_bad, 1)), "corrupted_trivial": float(sums[3] / max(n_bad, 1)),
            "corrupted_fraction": n_bad / max(n_all, 1), "learned": bool(value < max_ratio * trivial)}


def untrained_copy(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``network`` with every parameter (and batch-norm statistic) re-initialised as at construction,
    under a fixed ``seed``: "the same network untrained", reproducibly."""
    fresh = copy.deepcopy(network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    return fresh


def barlow_health(network, batches, fit_batches=None, keys: Sequence[str] = ("view1", "view2"), lambd: float = 5e-3,
                  seed: int = 0) -> dict:
    """The Barlow Twins pretext (Zbontar et al. 2021): its loss, on-diagonal (invariance) + ``lambd`` x
    off-diagonal (redundancy) terms of the cross-correlation of the two views' projections over all held-out
    crops at once, beside the same network untrained (:func:`untrained_copy`, the trivial solution: what the
    architecture gives before any pretraining). ``learned``: the trained loss is below the untrained one."""
    from .barlow_twins import barlow_terms

    def terms(net):
        dev = _device(net)
        z = [torch.cat([net(torch.as_tensor(b[k]).to(dev).float()).float() for b in batches]) for k in keys]
        on, off = barlow_terms(*z)
        return float(on), float(off), int(z[0].shape[0])

    on, off, n = terms(network)
    on0, off0, _ = terms(untrained_copy(network, seed).eval())
    value, trivial = on + lambd * off, on0 + lambd * off0
    return {"metric": "barlow_twins_loss", "value": value, "trivial": trivial, "trivial_rule": "untrained network",
            "on_diagonal": on, "off_diagonal": off, "trivial_on_diagonal": on0, "trivial_off_diagonal": off0,
            "samples": n, "learned": bool(value < trivial)}
