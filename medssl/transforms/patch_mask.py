"""Random patch masking for the inter-modality reconstruction pretext of Cluster-Re-Supervision
(Kuang et al., "Cluster-Re-Supervision: Bridging the Gap Between Image-Level and Pixel-Wise Labels
for Weakly Supervised Medical Image Segmentation", IEEE JBHI 27(10):4890-4901, 2023).

The input modalities are tiled by a regular grid of patches, a fixed fraction of the patches is
replaced by a constant, and the network is trained to reconstruct a *different* modality from what
is left, so that it has to learn the anatomy shared by the modalities rather than copy intensities.

Why not :class:`monai.transforms.RandCoarseDropout`: it drops ``holes`` boxes at arbitrary,
possibly overlapping positions, so the masked fraction of the image is random and a hole may cut
across the patch a reconstruction loss is computed on. Here the patches form a fixed grid and
exactly ``round(mask_ratio * n_patches)`` of them are masked, which fixes the masked fraction per
sample; it also offers an independent mask per channel and exposes the mask itself (for a loss
restricted to masked voxels). Its fill code (a Python loop over holes, numpy only) is not reused:
here the mask is one broadcast boolean array applied in one vectorised operation on numpy or torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from .wrapper import RandomDictWrapper


class RandPatchMask(RandomizableTransform):
    """Mask a random, exact fraction of the cells of a regular patch grid (inter-modality reconstruction).

    Args:
        patch_size: spatial size of one grid cell, an int for every axis or one value per axis, each
            >= 1 and at most the image size on that axis (``ValueError`` at call time otherwise).
        mask_ratio: fraction of the grid cells masked, in ``[0, 1)``; exactly
            ``round(mask_ratio * n_patches)`` cells are masked (Python's ``round``), drawn without
            replacement. ``0`` leaves the image unchanged.
        fill_value: value written into the masked voxels (cast to the image dtype).
        same_for_all_channels: ``True``: one spatial mask shared by every channel (modality);
            ``False``: an independent draw (with the same number of masked cells) per channel.
        prob: probability of masking at all; when the draw fails the mask is empty.

    Input is channel-first ``(C, *spatial)`` with any number of spatial axes (2D and 3D share the
    code), numpy or torch (MetaTensor metadata is kept, as are type, dtype and device); the output is
    a new array of the same kind and shape. The grid starts at the first voxel of every axis; when a
    patch size does not divide the image, the last cell of that axis is the clipped remainder and
    counts as one cell, so the grid has ``ceil(spatial / patch_size)`` cells per axis.

    After a call, :attr:`mask` is the boolean mask used (``True`` = masked): of shape ``spatial`` when
    shared, ``(C, *spatial)`` otherwise; :attr:`grid_mask` is the same at cell resolution
    (``ceil(spatial / patch)`` per axis, with a leading ``C`` axis when not shared). The voxel mask is
    the cell mask upsampled by ``np.repeat`` along each axis and cropped, without loops over cells.
    """

    backend = ["torch", "numpy"]

    def __init__(self, patch_size: Sequence[int] | int, mask_ratio: float = 0.5, fill_value: float = 0.0,
                 same_for_all_channels: bool = True, prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1) (a fraction of the patch grid), got {mask_ratio}")
        sizes = (patch_size,) if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
        if len(sizes) == 0 or any(int(p) < 1 for p in sizes):
            raise ValueError(f"patch_size must be >= 1 on every axis, got {patch_size}")
        self.patch_size = patch_size
        self.mask_ratio = float(mask_ratio)
        self.fill_value = float(fill_value)
        self.same_for_all_channels = bool(same_for_all_channels)
        self.mask: np.ndarray | None = None
        self.grid_mask: np.ndarray | None = None

    def patch(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The patch size for an image of spatial shape ``spatial``, checked to fit."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) == 0:
            raise ValueError("the image has no spatial axis: expected channel-first (C, *spatial)")
        if not isinstance(self.patch_size, (int, np.integer)) and len(self.patch_size) != len(spatial):
            raise ValueError(f"patch_size {tuple(self.patch_size)} has {len(self.patch_size)} axes but the image "
                             f"has {len(spatial)} spatial axes (spatial shape {spatial})")
        patch = tuple(int(p) for p in ensure_tuple_rep(self.patch_size, len(spatial)))
        if any(p > s for p, s in zip(patch, spatial)):
            raise ValueError(f"patch_size {patch} is larger than the image (spatial shape {spatial})")
        return patch

    def grid_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Cells per axis, ``ceil(spatial / patch_size)`` (a clipped last cell counts as one)."""
        return tuple(-(-int(s) // p) for s, p in zip(spatial, self.patch(spatial)))

    def num_masked(self, spatial: Sequence[int]) -> int:
        """How many cells of the grid of an image of spatial shape ``spatial`` are masked (per channel)."""
        return int(round(self.mask_ratio * int(np.prod(self.grid_shape(spatial)))))

    def randomize(self, img: NdarrayOrTensor) -> None:  # type: ignore[override]
        """Draw :attr:`grid_mask` and :attr:`mask` for the channel-first ``img`` (only its shape is used)."""
        super().randomize(None)
        self.draw(tuple(int(s) for s in img.shape[1:]), int(img.shape[0]), self._do_transform)

    def draw(self, spatial: Sequence[int], channels: int = 1, active: bool = True) -> np.ndarray:
        """Draw :attr:`mask` for ``channels`` channels of spatial shape ``spatial`` and return it (no
        ``prob`` draw: ``active=False`` gives an empty mask without consuming random numbers)."""
        spatial = tuple(int(s) for s in spatial)
        patch = self.patch(spatial)
        grid = self.grid_shape(spatial)
        rows = 1 if self.same_for_all_channels else int(channels)
        n, n_mask = int(np.prod(grid)), self.num_masked(spatial)
        cells = np.zeros((rows, n), dtype=bool)
        if active and n_mask > 0:
            # n_mask distinct cells per row: the positions of the n_mask smallest of n uniform variates
            picked = np.argpartition(self.R.random_sample((rows, n)), n_mask - 1, axis=1)[:, :n_mask]
            np.put_along_axis(cells, picked, True, axis=1)
        cells = cells.reshape((rows, *grid))
        voxels = cells
        for ax, (p, s) in enumerate(zip(patch, spatial), start=1):  # a loop over axes, not over cells
            voxels = np.repeat(voxels, p, axis=ax)[(slice(None),) * ax + (slice(0, s),)]
        if self.same_for_all_channels:
            cells, voxels = cells[0], voxels[0]
        self.grid_mask = cells
        self.mask = np.ascontiguousarray(voxels)
        return self.mask

    def apply_mask(self, img: NdarrayOrTensor, mask: np.ndarray | torch.Tensor) -> NdarrayOrTensor:
        """Write :attr:`fill_value` where ``mask`` (spatial, or ``(C, *spatial)``) is ``True``, in a copy."""
        shared_shape, full_shape = tuple(img.shape[1:]), tuple(img.shape)
        if tuple(mask.shape) not in (shared_shape, full_shape):
            raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither the spatial shape {shared_shape} nor "
                             f"the image shape {full_shape}")
        if isinstance(img, torch.Tensor):
            x = img.as_tensor() if hasattr(img, "as_tensor") else img
            m = torch.as_tensor(mask, dtype=torch.bool, device=x.device)
            out = x.masked_fill(m, self.fill_value)  # a spatial mask broadcasts over the channels
        else:
            x = np.asarray(img)
            m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            out = x.copy()
            np.copyto(out, np.asarray(self.fill_value).astype(out.dtype), where=m.astype(bool))
        return convert_to_dst_type(out, img)[0]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize(img)
        if self.mask is None:
            raise RuntimeError("no mask drawn yet: call with randomize=True or call randomize() first")
        return self.apply_mask(img, self.mask)


class RandPatchMaskd(RandomDictWrapper):
    """Dictionary wrapper of :class:`RandPatchMask`: one draw per call, the same mask for every key.

    The mask is drawn for the shape of the first present key; every key must have the same spatial
    shape (and, with ``same_for_all_channels=False``, the same channel count), or ``ValueError``.
    The mask is written under ``mask_key`` as float32 (1 = masked) of shape ``(1, *spatial)`` when
    shared, ``(C, *spatial)`` otherwise, with the type and device of the first key's image (a
    MetaTensor image gives a MetaTensor mask with its metadata, so both can be saved alike). When the
    ``prob`` draw fails the images are copied unchanged and an all-zero mask is written, so every
    sample of a batch carries one. If none of the keys is present (``allow_missing_keys=True``) the
    data is returned unchanged, without a mask.
    """

    backend = RandPatchMask.backend

    def __init__(self, keys: KeysCollection, patch_size: Sequence[int] | int, mask_ratio: float = 0.5,
                 fill_value: float = 0.0, same_for_all_channels: bool = True, prob: float = 1.0,
                 mask_key: str = "mask", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.masker = self.inner = RandPatchMask(patch_size, mask_ratio, fill_value, same_for_all_channels, prob=1.0)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d, keys = self.present(data)
        if not keys:
            return d
        first = d[keys[0]]
        for key in keys[1:]:
            same = tuple(d[key].shape[1:]) == tuple(first.shape[1:])
            if not same or (not self.masker.same_for_all_channels and d[key].shape[0] != first.shape[0]):
                raise ValueError(f"key {key!r} has shape {tuple(d[key].shape)}, incompatible with the shape "
                                 f"{tuple(first.shape)} of key {keys[0]!r}: one mask is applied to every key")
        mask = self.masker.draw(first.shape[1:], int(first.shape[0]), self._do_transform)
        for key in keys:
            d[key] = self.masker.apply_mask(d[key], mask)
        out = mask[None] if self.masker.same_for_all_channels else mask
        d[self.mask_key] = convert_to_dst_type(out, first, dtype=torch.float32 if isinstance(first, torch.Tensor)
                                               else np.float32)[0]
        return d
