"""Bring 2D images with any of the usual channel layouts (grey, grey + alpha, RGB, RGBA) to the
channel count a network was configured for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion


class AsChannels(Transform):
    """Channel-first image ``(C, *spatial)`` -> ``(num_channels, *spatial)``.

    Alpha is dropped (C = 2 or 4); RGB becomes grey by BT.601 luma when ``num_channels=1``; grey is
    repeated when ``num_channels=3``. Any other combination raises ``ValueError`` naming the shapes.
    """

    backend = ["torch", "numpy"]

    def __init__(self, num_channels: int):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        self.num_channels = num_channels

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        t = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        c = t.shape[0]
        if c in (2, 4):  # grey+alpha, RGBA
            t, c = t[: c - 1], c - 1
        if c == self.num_channels:
            out = t
        elif c == 3 and self.num_channels == 1:
            out = (t * torch.tensor(LUMA, dtype=t.dtype).reshape(3, *([1] * (t.ndim - 1)))).sum(0, keepdim=True)
        elif c == 1 and self.num_channels == 3:
            out = t.repeat(3, *([1] * (t.ndim - 1)))
        else:
            raise ValueError(f"cannot turn an image of shape {tuple(t.shape)} into {self.num_channels} channel(s); "
                             f"expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels first")
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class AsChannelsd(MapTransform):
    """Dictionary wrapper of :class:`AsChannels`."""

    backend = AsChannels.backend

    def __init__(self, keys: KeysCollection, num_channels: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = AsChannels(num_channels)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class SelectModality(Transform):
    """Channel-first multi-modal image ``(len(modalities), *spatial)`` -> ``(1, *spatial)``, the channel of
    ``modality``; a one-channel image (that modality alone) passes unchanged. For a single-modality network
    (semi_cml) fed a study that stacks all modalities (MONAI Label's one image per study: BraTS as one
    4-channel NIfTI, channels in ``modalities`` order). Any other channel count raises
    :class:`medssl.data.DataError` naming the image and what was expected."""

    backend = ["torch", "numpy"]

    def __init__(self, modality: str, modalities=("flair", "t1", "t1ce", "t2")):
        from medssl.utils import check_choice

        self.modalities = tuple(modalities)
        self.index = self.modalities.index(check_choice("modality", modality, self.modalities))

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        c = img.shape[0]
        if c == 1:
            return img
        if c == len(self.modalities):
            return img[self.index : self.index + 1]
        from medssl.data import DataError

        where = getattr(img, "meta", {}).get("filename_or_obj", "image")
        raise DataError([f"{where}: {c} channels; expected 1 (the {self.modalities[self.index]} volume) or "
                         f"{len(self.modalities)} (the modalities {', '.join(self.modalities)} in this order)"])


class SelectModalityd(MapTransform):
    """Dictionary wrapper of :class:`SelectModality`."""

    backend = SelectModality.backend

    def __init__(self, keys: KeysCollection, modality: str, modalities=("flair", "t1", "t1ce", "t2"),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectModality(modality, modalities)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key])
        return d
