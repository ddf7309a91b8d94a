"""Two independently augmented views of one sample, for joint-embedding self-supervision."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.transforms import MapTransform, Randomizable, Transform


class RandTwoViewsd(Randomizable, MapTransform):
    """Apply ``transform`` (a random dictionary transform chain on ``key``) twice, independently, and
    store the results under ``names``. The input ``key`` is left as it was.

    ``set_random_state`` seeds ``transform``, so the pair of views is reproducible.
    """

    def __init__(self, key: str, transform: Transform, names: Sequence[str] = ("view1", "view2")):
        MapTransform.__init__(self, [key])
        self.key = key
        self.transform = transform
        self.names = tuple(names)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for name in self.names:
            view = self.transform({self.key: d[self.key]})
            d[name] = view[self.key]
        return d
