"""One probability map binarised at every threshold of a grid at once (one channel per threshold), so that one
metric pass (MONAI's ``DiceMetric`` over channels) scores all the thresholds: what
:class:`medssl.engines.ThresholdSearch` chooses a threshold with."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor


class ThresholdGrid(Transform):
    """Probability map ``(1, *spatial)`` -> ``(len(thresholds), *spatial)``: channel ``i`` is ``img >= thresholds[i]``
    (as ``AsDiscrete(threshold=...)`` binarises), as float. 2D and 3D alike; the grid must be non-empty."""

    backend = ["torch", "numpy"]

    def __init__(self, thresholds: Sequence[float]):
        if not len(thresholds):
            raise ValueError("thresholds must name at least one threshold, got an empty grid")
        self.thresholds = [float(t) for t in thresholds]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        t = convert_to_tensor(img, track_meta=False)
        if t.shape[0] != 1:
            raise ValueError(f"ThresholdGrid expects one channel (a probability map), got shape {tuple(t.shape)}")
        grid = torch.tensor(self.thresholds, dtype=t.dtype, device=t.device).reshape(-1, *([1] * (t.ndim - 1)))
        return convert_to_dst_type((t >= grid).to(torch.float32), img, dtype=torch.float32)[0]


class ThresholdGridd(MapTransform):
    """Dictionary wrapper of :class:`ThresholdGrid`."""

    backend = ThresholdGrid.backend

    def __init__(self, keys: KeysCollection, thresholds: Sequence[float], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = ThresholdGrid(thresholds)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
