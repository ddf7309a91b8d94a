"""Context-swap corruption of Chen et al., "Self-supervised learning for medical image analysis
using image context restoration", Medical Image Analysis 58:101539, 2019
(doi:10.1016/j.media.2019.101539).

Two patches of the same size are picked at random positions and exchanged; this is repeated T
times. The corrupted image keeps exactly the voxel values (and so the intensity histogram) of the
original; only their spatial arrangement changes, so a network can restore it only by learning
anatomical context. All channels (co-registered modalities) are swapped at the same positions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep

from .wrapper import RandomDictWrapper


def _raw(img: NdarrayOrTensor):
    """A plain view of ``img`` sharing its memory: numpy for numpy and CPU tensors, a bare tensor
    otherwise. Slicing MetaTensors costs a metadata copy per slice, so the swaps work on this view."""
    if isinstance(img, torch.Tensor):
        t = img.as_tensor() if hasattr(img, "as_tensor") else img
        return t.detach().numpy() if t.device.type == "cpu" else t
    return img


def nonzero_foreground(img: NdarrayOrTensor) -> np.ndarray:
    """Foreground = voxels where any channel is non-zero: the brain of a skull-stripped MR volume, both
    raw (background 0) and after ``NormalizeIntensity(nonzero=True)`` (which z-scores the brain and
    leaves the background at exactly 0; the brain's minimum is then negative, so "differs from the
    minimum" would select every voxel). Zero padding counts as background too."""
    a = _raw(img)
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return (a != 0).any(axis=0)


class RandContextSwap(RandomizableTransform):
    """Swap ``num_swaps`` pairs of non-overlapping patches (context restoration corruption).

    Args:
        patch_size: spatial size of one patch, an int for every axis or one value per axis.
        num_swaps: T, the number of patch pairs exchanged. ``0`` returns the input unchanged.
        prob: probability of corrupting at all (the paper corrupts every sample: 1.0).
        foreground_only: restrict patch centres to foreground voxels (see ``select_fn``), so that
            swaps do not just exchange empty background.
        select_fn: maps a channel-first image to a spatial boolean foreground mask (numpy or torch);
            default :func:`nonzero_foreground` (any channel non-zero).
        max_attempts: candidate positions drawn per patch before giving up with a ``ValueError``.

    Every patch (of every pair) is disjoint from every other, so the output is a permutation of
    the input voxels in which only voxels inside the ``2 * num_swaps`` patches move. Input is
    channel-first ``(C, H, W[, D])``, numpy or torch (MetaTensor metadata is kept); the output has
    the same type, shape and dtype. The same ``spatial_dims``-agnostic code serves 2D and 3D.
    """

    backend = ["torch", "numpy"]

    def __init__(self, patch_size: Sequence[int] | int, num_swaps: int = 10, prob: float = 1.0,
                 foreground_only: bool = False, select_fn: Callable = nonzero_foreground, max_attempts: int = 50):
        RandomizableTransform.__init__(self, prob)
        if num_swaps < 0:
            raise ValueError(f"num_swaps must be >= 0, got {num_swaps}")
        self.patch_size = patch_size
        self.num_swaps = int(num_swaps)
        self.foreground_only = foreground_only
        self.select_fn = select_fn
        self.max_attempts = max_attempts
        self.corners: np.ndarray = np.zeros((0, 2, 0), dtype=int)  # (num_swaps, 2, spatial_dims)

    def _patch(self, spatial_shape: Sequence[int]) -> np.ndarray:
        patch = np.asarray(ensure_tuple_rep(self.patch_size, len(spatial_shape)), dtype=int)
        if np.any(patch < 1) or np.any(patch > np.asarray(spatial_shape)):
            raise ValueError(f"patch_size {tuple(patch)} must be >= 1 and fit in the image {tuple(spatial_shape)}")
        return patch

    def randomize(self, img: NdarrayOrTensor) -> None:  # type: ignore[override]
        """Draw the corners of ``num_swaps`` pairs of mutually disjoint patches for ``img``."""
        super().randomize(None)
        spatial = np.asarray(img.shape[1:], dtype=int)
        patch = self._patch(spatial)
        n = 2 * self.num_swaps
        if not self._do_transform or n == 0:
            self.corners = np.zeros((0, 2, len(spatial)), dtype=int)
            return
        high = spatial - patch + 1
        m = n * self.max_attempts
        if self.foreground_only:
            mask = self.select_fn(img)
            mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            flat = np.flatnonzero(mask)
            if len(flat) == 0:
                raise ValueError("foreground_only=True but the image has no foreground voxel")
            picked = flat[self.R.randint(0, len(flat), size=m)]
            cand = np.stack(np.unravel_index(picked, mask.shape), axis=1) - patch // 2
            cand = np.clip(cand, 0, high - 1)
        else:
            cand = (self.R.random_sample((m, len(spatial))) * high).astype(int)
        # greedy acceptance of candidates disjoint from every accepted patch: a loop over patches,
        # each step one vectorised comparison against all accepted corners
        accepted = np.empty((n, len(spatial)), dtype=int)
        k = 0
        for c in cand:
            if k and np.any(np.all(np.abs(accepted[:k] - c) < patch, axis=1)):
                continue
            accepted[k] = c
            k += 1
            if k == n:
                break
        if k < n:
            raise ValueError(f"could not place {n} disjoint patches of size {tuple(patch)} in an image of spatial "
                             f"shape {tuple(spatial)} ({k} placed); use fewer swaps or smaller patches")
        self.corners = accepted.reshape(self.num_swaps, 2, len(spatial))

    def swap(self, img: NdarrayOrTensor, corners: np.ndarray) -> NdarrayOrTensor:
        """Apply the swaps given by ``corners`` (``(T, 2, spatial_dims)``) to a copy of ``img``."""
        out = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
        if len(corners) == 0:
            return out
        patch = self._patch(img.shape[1:])
        view = _raw(out)  # same memory as ``out``
        for a, b in corners:
            sa = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(a, patch))
            sb = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(b, patch))
            tmp = view[sa].clone() if isinstance(view, torch.Tensor) else view[sa].copy()
            view[sa] = view[sb]
            view[sb] = tmp
        return out

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize(img)
        return self.swap(img, self.corners)


class RandContextSwapd(RandomDictWrapper):
    """Dictionary wrapper of :class:`RandContextSwap`: the same patches are swapped in every key.

    The foreground for ``foreground_only`` is taken from the first key. With ``corners_key`` set,
    the ``(num_swaps, 2, spatial_dims)`` corner array is stored in the output (for visualisation).
    """

    backend = RandContextSwap.backend

    def __init__(self, keys: KeysCollection, patch_size: Sequence[int] | int, num_swaps: int = 10, prob: float = 1.0,
                 foreground_only: bool = False, select_fn: Callable = nonzero_foreground, max_attempts: int = 50,
                 corners_key: str | None = None, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.swapper = self.inner = RandContextSwap(patch_size, num_swaps, 1.0, foreground_only, select_fn, max_attempts)
        self.corners_key = corners_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d, keys = self.present(data)
        if not keys:
            return d
        if self._do_transform:
            self.swapper.randomize(d[keys[0]])
        else:
            self.swapper.corners = np.zeros((0, 2, d[keys[0]].ndim - 1), dtype=int)
        for key in keys:
            d[key] = self.swapper.swap(d[key], self.swapper.corners)
        if self.corners_key:
            d[self.corners_key] = self.swapper.corners.copy()
        return d
