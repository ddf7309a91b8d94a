"""Batched k-means in torch, the pixel clustering step of Cluster-Re-Supervision (Kuang et al.,
"Cluster-Re-Supervision: Bridging the Gap Between Image-Level and Pixel-Wise Labels for Weakly
Supervised Medical Image Segmentation", IEEE JBHI 27(10):4890-4901, 2023).

There the features of the pixels of an image are clustered and the clusters are re-supervised
with the image-level label. Every image is its own clustering problem, so :func:`kmeans` solves a
batch of ``B`` independent problems at once, each on ``N`` points (pixels) of dimension ``D``,
without Python loops over points or clusters.
"""

from __future__ import annotations

import torch

__all__ = ["kmeans"]

_INITS = ("k-means++", "random")


def _assign(x: torch.Tensor, c: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point, ``(B, N)`` long (-1 where not valid), and its squared distance
    (0 where not valid)."""
    dist, labels = torch.cdist(x, c).min(dim=2)
    d2 = dist.square().masked_fill(~valid, 0.0)
    return labels.masked_fill(~valid, -1), d2


def _pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of the non-negative ``weights`` (B, N) with the uniform
    ``u`` in [0, 1) (a scalar or (B,)); a zero-weight index is never drawn."""
    cdf = weights.double().cumsum(dim=1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(weights.shape[1] - 1)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int | None = 0, valid: torch.Tensor | None = None,
           init: str = "k-means++", return_inertia: bool = False):
    """Cluster each of a batch of point sets into ``k`` clusters (Lloyd's algorithm).

    Args:
        x: ``(B, N, D)`` points: ``B`` independent problems of ``N`` points (e.g. the D-dim features
            of the N pixels of each image). Any device; a non float32/float64 dtype is computed in
            float32.
        k: number of clusters, ``>= 1`` and at most the number of valid points of every problem.
        iters: Lloyd iterations (assignment, then centroid update), ``>= 0``.
        seed: seed of the ``torch.Generator`` behind the initialisation; ``None`` draws a fresh seed.
            A fixed seed makes the result deterministic.
        valid: optional ``(B, N)`` boolean; points marked ``False`` (e.g. background pixels) take
            no part in the clustering and get label ``-1``.
        init: ``"k-means++"`` (first centroid uniform, each next one drawn with probability
            proportional to the squared distance to the nearest chosen centroid) or ``"random"``
            (``k`` distinct valid points, uniformly).
        return_inertia: also return the ``(B, iters + 1)`` inertia history: entry ``t`` is the sum
            over valid points of the squared distance to the nearest of the centroids after ``t``
            updates. It never increases (up to float rounding).

    Returns:
        ``(labels, centroids)``, or ``(labels, centroids, inertia)``: labels ``(B, N)`` long in
        ``[0, k)`` (``-1`` for invalid points) are the nearest returned centroid of each point
        (a last assignment follows the last update); centroids are ``(B, k, D)``.

    The random variates of the initialisation are drawn on the CPU from one generator and shared
    by all problems of the batch (the same uniform drives the j-th ++ draw of every problem), so a
    problem gets the same result alone as inside any batch, on any device. Distances come from
    ``torch.cdist`` and centroid sums from ``scatter_add_``; the only Python loops run over the
    iterations and over the ``k`` draws of the ++ initialisation. A cluster left empty by an update
    is re-seeded at the valid points farthest from their centroids (the i-th empty cluster of a
    problem at its i-th farthest point), which never increases the inertia.
    """
    x = x.as_subclass(torch.Tensor)  # a MetaTensor's metadata means nothing here (and breaks new_empty)
    if valid is not None:
        valid = valid.as_subclass(torch.Tensor)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) (a batch of N points of dimension D), got shape {tuple(x.shape)}")
    b, n, dim = x.shape
    k, iters = int(k), int(iters)
    if k < 1:
        raise ValueError(f"k must be >= 1, got K={k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        what = "feature pixels"
    else:
        if tuple(valid.shape) != (b, n):
            raise ValueError(f"valid must be (B, N) = {(b, n)} to match x of shape {tuple(x.shape)}, "
                             f"got {tuple(valid.shape)}")
        valid = valid.to(device=x.device, dtype=torch.bool)
        what = "valid feature pixels"
    counts = valid.sum(dim=1)
    if b and n and dim == 0:
        raise ValueError("x has D=0 feature dimensions")
    if b:
        worst = int(counts.argmin())
        if k > int(counts[worst]):
            raise ValueError(f"K={k} exceeds the {int(counts[worst])} {what} of problem {worst} "
                             f"(of a batch of {b}): k must not exceed the number of points clustered")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()

    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    rows = torch.arange(b, device=x.device)
    validf = valid.to(x.dtype)

    # ---- initialisation: k distinct valid points per problem
    if init == "random":
        score = torch.rand(n, generator=gen).to(x.device).expand(b, n).masked_fill(~valid, -1.0)
        idx = score.topk(k, dim=1).indices  # (B, k): the k valid points of largest score
        c = x[rows[:, None], idx]
    else:
        u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
        first = _pick(validf, u[0])
        c = x.new_empty(b, k, dim)
        c[:, 0] = x[rows, first]
        d2 = (x - c[:, :1]).square().sum(-1)
        for j in range(1, k):  # a loop over k, each step vectorised over the batch and the points
            w = d2.clamp_min(0) * validf
            dead = w.sum(1, keepdim=True) == 0  # every valid point already a centroid: draw uniformly
            w = torch.where(dead, validf, w)
            nxt = _pick(w, u[j])
            c[:, j] = x[rows, nxt]
            d2 = torch.minimum(d2, (x - c[:, j:j + 1]).square().sum(-1))

    labels, d2 = _assign(x, c, valid)
    history = [d2.sum(1)]
    for _ in range(iters):
        # ---- update: per-cluster means by scatter_add_ over the labels (invalid points weigh 0)
        lab = labels.clamp_min(0)
        sums = x.new_zeros(b, k, dim).scatter_add_(1, lab.unsqueeze(-1).expand(b, n, dim), x * validf.unsqueeze(-1))
        sizes = x.new_zeros(b, k).scatter_add_(1, lab, validf)
        empty = sizes == 0
        c = torch.where(empty.unsqueeze(-1), c, sums / sizes.clamp_min(1).unsqueeze(-1))
        if bool(empty.any()):  # re-seed empty clusters at the farthest valid points
            far = d2.masked_fill(~valid, -1.0).topk(k, dim=1).indices  # (B, k), valid as k <= valid count
            rank = (empty.cumsum(1) - 1).clamp_min(0)
            c = torch.where(empty.unsqueeze(-1), x[rows[:, None], far.gather(1, rank)], c)
        # ---- assignment
        labels, d2 = _assign(x, c, valid)
        history.append(d2.sum(1))
    if return_inertia:
        return labels, c, torch.stack(history, dim=1)
    return labels, c
