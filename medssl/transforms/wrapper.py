"""The common part of medssl's random dictionary transforms: a thin wrapper of one array transform."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from monai.transforms import MapTransform, RandomizableTransform


class RandomDictWrapper(RandomizableTransform, MapTransform):
    """A MONAI dictionary transform around one random array transform (``self.inner``): seeding the
    wrapper seeds the array transform too (one draw per call is shared by every key), and
    :meth:`present` starts a call: the wrapper's own ``prob`` draw, a shallow copy of the data and the
    keys present in it."""

    inner: RandomizableTransform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.inner.set_random_state(seed, state)
        return self

    def present(self, data: Mapping[Hashable, object]) -> tuple[dict, list]:
        d = dict(data)
        self.randomize(None)
        return d, list(self.key_iterator(d))
