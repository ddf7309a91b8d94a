"""Pretext health of the block-mix pretext (SLeM): the network's accuracy beside chance and beside a probe that
reads the combination off per-block intensity histograms, with no spatial learning at all.

Each modality has its own intensity distribution, so with plain block copies a linear model of a block's
histogram tells which modality a channel holds there, and the per-block guesses name the combination: on the
BraTS sample such a probe was right as often as the trained network (``docs/methods/slem.md``). A pretraining
has learned something the shortcut does not give only if the network beats that probe on held-out crops.
:func:`block_mix_health` is the measure for :class:`medssl.engines.PretextHealth`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..transforms.block_mix import _to_blocks

PROBE_RULE = ("multinomial logistic regression of the modality from each (block, channel)'s foreground intensity "
              "histogram (32 bins on fixed edges) + 10 quantiles + mean + std, fitted on training-case crops; "
              "combination = argmax of the summed per-block log-probabilities of its layout")


def _tensor(x, device=None) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device) if device is not None else x


def block_intensity_features(images: torch.Tensor, grid: Sequence[int], bins: int = 32,
                             value_range: tuple[float, float] = (-3.0, 5.0), num_quantiles: int = 10,
                             resolution: int = 16) -> torch.Tensor:
    """``(N, M, *spatial)`` -> ``(N, B, M, F)``: for every crop, block (C order) and channel, intensity features of
    the block's foreground (voxels non-zero in any channel of the block): a ``bins``-bin histogram on fixed edges
    over ``value_range`` (values outside fall in the end bins; fractions of the foreground), ``num_quantiles``
    quantiles at ``(i + 0.5) / num_quantiles`` (read off a histogram ``resolution`` times finer, so to within
    ``(hi - lo) / (bins * resolution)``), mean and standard deviation. ``F = bins + num_quantiles + 2``.
    Vectorised (one scatter-add per batch), on the images' device."""
    x = _tensor(images).float()
    n, m = x.shape[:2]
    grid = tuple(int(g) for g in grid)
    xb = _to_blocks(x.reshape(n * m, *x.shape[2:]), grid)  # (B, N*M, v)
    nb, v = xb.shape[0], xb.shape[-1]
    xb = xb.reshape(nb, n, m, v).transpose(0, 1)  # (N, B, M, v)
    fg = (xb != 0).any(2, keepdim=True).expand_as(xb)
    cnt = fg.sum(-1, keepdim=True).clamp_min(1).float()  # (N, B, 1, 1)
    lo, hi = float(value_range[0]), float(value_range[1])
    nf = int(bins) * int(resolution)
    idx = ((xb - lo) * (nf / (hi - lo))).floor().clamp(0, nf - 1).long()
    fine = torch.zeros(n, nb, m, nf, device=x.device).scatter_add_(-1, idx, fg.float()) / cnt
    hist = fine.reshape(n, nb, m, bins, resolution).sum(-1)
    cdf = fine.cumsum(-1).contiguous()
    q = ((torch.arange(num_quantiles, device=x.device) + 0.5) / num_quantiles).expand(n, nb, m, num_quantiles)
    qbin = torch.searchsorted(cdf, q.contiguous()).clamp(max=nf - 1)
    quant = lo + (qbin.float() + 0.5) * ((hi - lo) / nf)
    vals = torch.where(fg, xb, 0)
    mean = vals.sum(-1, keepdim=True) / cnt
    std = (torch.where(fg, (xb - mean) ** 2, 0).sum(-1, keepdim=True) / cnt).sqrt()
    return torch.cat([hist, quant, mean, std], -1)


class LinearProbe:
    """Multinomial logistic regression (features standardised on the fit set, L2 penalty ``weight_decay``) fitted
    by L-BFGS with torch: no sklearn. :meth:`log_prob` gives the class log-probabilities."""

    def __init__(self, num_classes: int, weight_decay: float = 1e-3, max_iter: int = 300):
        self.num_classes, self.weight_decay, self.max_iter = int(num_classes), float(weight_decay), int(max_iter)

    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> "LinearProbe":
        x, y = features.reshape(-1, features.shape[-1]).float(), targets.reshape(-1).long().to(features.device)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.weight = torch.zeros(z.shape[1], self.num_classes, device=z.device, requires_grad=True)
        self.bias = torch.zeros(self.num_classes, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], lr=1.0, max_iter=self.max_iter,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ self.weight + self.bias, y) \
                + self.weight_decay * (self.weight ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():  # PretextHealth measures under no_grad
            opt.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()
        return self

    def log_prob(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.std
        return torch.log_softmax(z @ self.weight + self.bias, -1)


def combination_scores(block_log_prob: torch.Tensor, combinations) -> torch.Tensor:
    """``(N, B, M, M)`` per-block (channel, modality) log-probabilities -> ``(N, K)`` combination scores: the sum of
    the log-probabilities of each combination's layout (``table[k][c, b]`` = the modality in channel ``c`` at block
    ``b``), exactly as :class:`medssl.networks.BlockMixHead` scores them."""
    from ..networks.heads import combination_onehot, score_combinations

    table = torch.as_tensor(np.array(combinations, dtype=np.int64), device=block_log_prob.device)
    return score_combinations(block_log_prob, combination_onehot(table))

def _layouts(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(N,)`` class indices -> ``(N, B, M)``: the modality each channel holds at each block."""
    return table[labels.long()].permute(0, 2, 1)


def block_mix_health(network, batches, fit_batches=None, combinations=None, grid: Sequence[int] | None = None,
                     image_key: str = "image", label_key: str = "label", margin: float = 0.05, bins: int = 32,
                     value_range: tuple[float, float] = (-3.0, 5.0), num_quantiles: int = 10,
                     weight_decay: float = 1e-3, max_iter: int = 300) -> dict:
    """The block-mix pretext's health on held-out crops (``batches``: ``image_key`` mixed crops, ``label_key`` their
    combination index), for :class:`medssl.engines.PretextHealth`.

    - ``value``: the network's accuracy (``network(x)`` gives the ``(N, K)`` combination logits).
    - ``trivial``: chance, ``1 / K`` (``trivial_rule`` ``"chance"``).
    - ``probe``: the accuracy of a histogram probe with no spatial learning (:data:`PROBE_RULE`): a
      :class:`LinearProbe` of the modality from :func:`block_intensity_features` of each (block, channel), one model
      shared by all blocks and channels, fitted on ``fit_batches`` (training-case crops, their labels giving each
      block's layout), and combined into combination scores as the network's head does
      (:func:`combination_scores`). ``probe_block_accuracy``: how often it names a (block, channel)'s modality
      (chance ``1 / M``). ``None`` without ``fit_batches``.
    - ``learned``: ``value > max(trivial, probe) + margin``.

    ``combinations`` (the transform's ``(K, M, B)`` table) and ``grid`` (its blocks per axis) default to the
    network's own (``BlockMixHead.combination_onehot``, ``.grid``). Everything runs on the network's device; on one
    CPU thread the features and the probe of 32 + 64 crops of 4 x 64^3 take about 2 s, the network's forward
    passes about as much."""
    dev = next(network.parameters()).device
    if combinations is None:
        combinations = network.combination_onehot.argmax(-1).permute(0, 2, 1).cpu().numpy()
    table = torch.as_tensor(np.array(combinations, dtype=np.int64), device=dev)
    k, m, nb = table.shape
    grid = tuple(int(g) for g in (grid if grid is not None else network.grid))
    if math.prod(grid) != nb:
        raise ValueError(f"the block grid {grid} has {math.prod(grid)} blocks but the combinations cover {nb}")
    feat = dict(bins=bins, value_range=value_range, num_quantiles=num_quantiles)

    correct, labels, feats = 0, [], []
    for b in batches:
        x, y = _tensor(b[image_key], dev).float(), _tensor(b[label_key], dev).long().reshape(-1)
        correct += int((network(x).argmax(-1) == y).sum())
        labels.append(y)
        feats.append(block_intensity_features(x, grid, **feat))
    total = sum(len(y) for y in labels)
    value = correct / max(total, 1)
    trivial = 1.0 / k
    result = {"metric": "block_mix_accuracy", "value": value, "trivial": trivial, "trivial_rule": "chance",
              "probe": None, "probe_rule": PROBE_RULE, "probe_block_accuracy": None, "margin": float(margin),
              "num_combinations": int(k)}
    fit_feats, fit_layouts = [], []
    for b in fit_batches or []:
        x, y = _tensor(b[image_key], dev).float(), _tensor(b[label_key], dev).long().reshape(-1)
        fit_feats.append(block_intensity_features(x, grid, **feat))
        fit_layouts.append(_layouts(y, table))
    if fit_feats and total:
        probe = LinearProbe(m, weight_decay, max_iter).fit(torch.cat(fit_feats), torch.cat(fit_layouts))
        logp = probe.log_prob(torch.cat(feats))  # (N, B, M, M)
        y = torch.cat(labels)
        result["probe"] = float((combination_scores(logp, table).argmax(-1) == y).float().mean())
        result["probe_block_accuracy"] = float((logp.argmax(-1) == _layouts(y, table)).float().mean())
    result["learned"] = bool(value > max(trivial, result["probe"] or 0.0) + margin)
    return result
