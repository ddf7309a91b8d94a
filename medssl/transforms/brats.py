"""Turn the three BraTS region channels back into a BraTS label map.

The inverse of MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` (channels TC, WT, ET):
ET -> 4, TC without ET -> 1 (necrosis / non-enhancing core), WT without TC -> 2 (edema).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor


class BratsRegionsToLabel(Transform):
    """``(3, *spatial)`` binary TC/WT/ET channels -> ``(1, *spatial)`` label map with values 0, 1, 2, 4.

    Regions are made nested first (ET inside TC inside WT), as the BraTS definition requires.
    """

    backend = ["torch", "numpy"]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        t = convert_to_tensor(img, track_meta=False) > 0.5
        if t.shape[0] != 3:
            raise ValueError(f"expected 3 channels (TC, WT, ET), got shape {tuple(t.shape)}")
        et = t[2]
        tc = t[0] | et
        wt = t[1] | tc
        out = torch.zeros_like(t[:1], dtype=torch.uint8)
        out[0][wt] = 2
        out[0][tc] = 1
        out[0][et] = 4
        return convert_to_dst_type(out, img, dtype=torch.uint8)[0]


class BratsRegionsToLabeld(MapTransform):
    """Dictionary wrapper of :class:`BratsRegionsToLabel`."""

    backend = BratsRegionsToLabel.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = BratsRegionsToLabel()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


def case_output_name(metadict: dict, saver) -> dict:
    """``SaveImage`` ``output_name_formatter``: name outputs after the case folder, not the first modality
    file (``<case>/<case>_flair.nii.gz`` -> subject ``<case>``)."""
    from pathlib import Path

    src = metadict.get("filename_or_obj", "")
    src = src[0] if isinstance(src, (list, tuple)) else src
    out = {"subject": Path(str(src)).parent.name or Path(str(src)).name.split(".")[0]}
    if metadict.get("patch_index") is not None:
        out["idx"] = metadict["patch_index"]
    return out
