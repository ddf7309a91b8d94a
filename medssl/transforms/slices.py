"""Keep only the labelled axial slices of a volume (slice-level label budgets, ``label_unit`` ``"slice"``)."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


class SelectSlicesd(MapTransform):
    """Stack the slices ``d[slices_key]`` (indices along the last axis, e.g. the RAS axial slices that
    :func:`medssl.data.label_slices` labelled) of every ``keys`` array into a smaller volume, and drop
    ``slices_key``. The slices need not be adjacent: a 2D network trained on depth-1 crops then sees only
    labelled slices. An item without ``slices_key`` (a fully labelled volume) passes unchanged, so the same
    pipeline serves volume- and slice-level datalists. An index outside the volume is a ``ValueError``
    naming the case.
    """

    def __init__(self, keys: KeysCollection, slices_key: str = "labelled_slices", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.slices_key = slices_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.slices_key not in d:
            return d
        index = [int(z) for z in d.pop(self.slices_key)]
        for key in self.key_iterator(d):
            depth = d[key].shape[-1]
            if not index or min(index) < 0 or max(index) >= depth:
                raise ValueError(f"{d.get('case', key)}: {self.slices_key} {index} outside the {depth} slices of "
                                 f"{key!r}; expected indices in [0, {depth}) (RAS axial slices)")
            d[key] = d[key][..., index]
        return d
