"""Modality block mixing, the pretext task of SLeM (Wang et al., 2025, "Self-supervised learning for
multi-modal medical image segmentation").

Each of the M co-registered modalities (channels) of an image is cut into the same uniform grid of
B blocks. At every block position the M modality blocks are redistributed over the M output
channels by a permutation; the B permutations together form one *combination*. A fixed table of K
distinct combinations defines a K-class classification problem: the network sees the mixed image
and has to tell which combination produced it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from .wrapper import RandomDictWrapper

# at most this many possible combinations are enumerated (sampled by index without replacement);
# above it, random permutations are drawn and duplicates rejected
_ENUMERATE_LIMIT = 1_000_000


def combination_table(num_modalities: int, num_blocks: int, num_combinations: int, seed: int = 0) -> np.ndarray:
    """``num_combinations`` distinct combinations, a ``(K, M, B)`` int64 array fixed by its arguments.

    ``table[k][c, b]`` is the input modality copied to output channel ``c`` at block ``b``; every
    column ``table[k][:, b]`` is a permutation of ``range(M)``. There are ``(M!)**B`` possible
    combinations; asking for more raises ``ValueError``. The draw uses only
    ``numpy.random.default_rng(seed)``, never a transform's random state.
    """
    m, nb, k = int(num_modalities), int(num_blocks), int(num_combinations)
    if m < 1 or nb < 1 or k < 1:
        raise ValueError(f"num_modalities, num_blocks and num_combinations must be >= 1, got {m}, {nb}, {k}")
    f = math.factorial(m)
    total = f**nb  # a Python int: no overflow however large
    if k > total:
        raise ValueError(f"num_combinations={k} exceeds the {total} possible combinations (M!)**B of "
                         f"M={m} modalities over B={nb} block(s)")
    rng = np.random.default_rng(seed)
    if total <= _ENUMERATE_LIMIT:
        perms = np.asarray(list(itertools.permutations(range(m))), dtype=np.int64)  # (M!, M), lexicographic
        codes = rng.choice(total, size=k, replace=False).astype(np.int64)
        digits = (codes[:, None] // (f ** np.arange(nb - 1, -1, -1, dtype=np.int64))) % f  # (K, B) base M!
        table = perms[digits].transpose(0, 2, 1)  # (K, B, M) -> (K, M, B)
    else:
        found: dict[bytes, np.ndarray] = {}
        while len(found) < k:
            n = k - len(found)
            cand = rng.random((n + n // 8 + 1, nb, m)).argsort(-1).transpose(0, 2, 1)  # uniform permutations
            for c in np.ascontiguousarray(cand, dtype=np.int64):
                found.setdefault(c.tobytes(), c)
                if len(found) == k:
                    break
        table = np.stack(list(found.values()))
    table = np.ascontiguousarray(table, dtype=np.int64)
    table.flags.writeable = False
    return table


class RandModalityBlockMix(RandomizableTransform):
    """Recombine modality blocks across channels by one of K fixed combinations (SLeM pretext task).

    Args:
        num_modalities: M, the channel count the input must have exactly (``ValueError`` otherwise).
        blocks: blocks per spatial axis, an int (repeated for every axis) or one value per axis, each
            >= 1: ``(2, 2, 1)`` in 3D or ``(2, 2)`` in 2D cuts the image into B = 4 blocks. The grid
            must divide the spatial shape exactly.
        num_combinations: K, the number of classes. At most ``(M!)**B``.
        seed: seed of the combination table. The table is a fixed function of (M, B, K, seed) and
            not of the transform's random state, so every worker and every run agree on what class
            ``k`` means; ``set_random_state`` only changes which classes are drawn.
        spatial_dims: optional; needed only to know B (and :attr:`combinations`) before the first
            call when ``blocks`` is an int > 1. With a sequence ``blocks`` it must match its length.

    Input is channel-first ``(M, *spatial)``, 2D or 3D (the same code serves any number of spatial
    axes), numpy or torch; a MetaTensor keeps its metadata (affine ...), and type, dtype and device
    are kept. Blocks are numbered in C order of their grid position (last axis fastest). With
    ``table = combinations`` of shape ``(K, M, B)``, combination ``k`` writes to output channel
    ``c`` at block ``b`` an exact copy of block ``b`` of input channel ``table[k, c, b]``. Every
    column ``table[k, :, b]`` is a permutation, so each block position still holds every modality
    exactly once, and the K combinations are pairwise distinct, so the class index is a label of
    the output. :meth:`randomize` draws ``k`` uniformly from ``range(K)`` into :attr:`label`;
    :meth:`mix` applies a given ``k`` as M x B strided block copies straight into the output, each
    vectorised over the block's voxels: for the few blocks of the pretext this beats a single
    advanced-indexing gather, which needs extra full copies of the image (measured in
    ``benchmarks/bench_block_mix.py``).

    With an int ``blocks`` B depends on the number of spatial axes (``blocks**spatial_dims``); one
    table per B is kept, and :attr:`combinations` is the table of the most recent input.
    """

    backend = ["torch", "numpy"]

    def __init__(self, num_modalities: int = 4, blocks: Sequence[int] | int = 2, num_combinations: int = 100,
                 seed: int = 0, spatial_dims: int | None = None, spatial_size: Sequence[int] | None = None):
        RandomizableTransform.__init__(self, prob=1.0)
        if spatial_size is not None:  # the crop size the pipeline will feed: check the grid now, not mid-training
            spatial_size = tuple(int(v) for v in spatial_size)
            if spatial_dims is not None and spatial_dims != len(spatial_size):
                raise ValueError(f"spatial_size {spatial_size} has {len(spatial_size)} axes but spatial_dims={spatial_dims}")
            spatial_dims = len(spatial_size)
        if int(num_modalities) < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        if int(num_combinations) < 1:
            raise ValueError(f"num_combinations must be >= 1, got {num_combinations}")
        if isinstance(blocks, (int, np.integer)):
            self.blocks: int | tuple[int, ...] = int(blocks)
            grid: tuple[int, ...] = (self.blocks,)
        else:
            self.blocks = tuple(int(b) for b in blocks)
            grid = self.blocks
            if len(grid) == 0:
                raise ValueError("blocks must be an int or a non-empty sequence of ints")
            if spatial_dims is not None and spatial_dims != len(grid):
                raise ValueError(f"blocks {grid} has {len(grid)} axes but spatial_dims={spatial_dims}")
            spatial_dims = len(grid)
        if min(grid) < 1:
            raise ValueError(f"blocks must be >= 1 on every axis, got {blocks}")
        self.num_modalities = int(num_modalities)
        self.num_combinations = int(num_combinations)
        self.seed = int(seed)
        self.spatial_dims = spatial_dims
        self.label: int | None = None
        self._tables: dict[int, np.ndarray] = {}
        self._last_b: int | None = None
        if spatial_dims is not None or self.blocks == 1:  # B known now: build (and check K) eagerly
            self._last_b = self.num_blocks(spatial_dims or 1)
            self.combinations_for(self._last_b)
        if spatial_size is not None:
            self.check_grid(spatial_size)

    def check_grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The block grid for a crop of size ``spatial``; ``ValueError`` if it does not divide the crop."""
        spatial = tuple(int(v) for v in spatial)
        grid = self.grid(len(spatial))
        if any(s % g for s, g in zip(spatial, grid)):
            raise ValueError(f"block grid {grid} does not divide the crop {spatial}")
        return grid

    def grid(self, spatial_dims: int) -> tuple[int, ...]:
        """Blocks per axis for an image with ``spatial_dims`` spatial axes."""
        if isinstance(self.blocks, int):
            return (self.blocks,) * spatial_dims
        if len(self.blocks) != spatial_dims:
            raise ValueError(f"block grid {self.blocks} has {len(self.blocks)} axes but the image has "
                             f"{spatial_dims} spatial axes")
        return self.blocks

    def num_blocks(self, spatial_dims: int | None = None) -> int:
        """B, the number of blocks per channel (``spatial_dims`` defaults to the configured one)."""
        dims = spatial_dims if spatial_dims is not None else self.spatial_dims
        if dims is None:
            if self.blocks == 1:
                return 1
            raise ValueError(f"blocks={self.blocks} is an int: B depends on the number of spatial axes; "
                             "pass spatial_dims (here or to the constructor) or a sequence of blocks")
        return math.prod(self.grid(dims))

    def combinations_for(self, num_blocks: int) -> np.ndarray:
        """The read-only ``(K, M, B)`` combination table for ``num_blocks`` blocks (cached)."""
        if num_blocks not in self._tables:
            self._tables[num_blocks] = combination_table(self.num_modalities, num_blocks, self.num_combinations,
                                                         self.seed)
        return self._tables[num_blocks]

    @property
    def combinations(self) -> np.ndarray:
        """The ``(K, M, B)`` table of the configured (or most recently seen) block grid."""
        b = self._last_b if self._last_b is not None else self.num_blocks()
        return self.combinations_for(b)

    def randomize(self, data=None) -> None:
        """Draw the class index ``k`` uniformly from ``range(num_combinations)`` into :attr:`label`."""
        self._do_transform = True
        self.label = int(self.R.randint(self.num_combinations))

    def mix(self, img: NdarrayOrTensor, k: int) -> NdarrayOrTensor:
        """Apply combination ``k`` to the channel-first ``img``; returns a new array of the same kind."""
        m = self.num_modalities
        if img.shape[0] != m:
            raise ValueError(f"expected num_modalities={m} channels, got {img.shape[0]} "
                             f"(image shape {tuple(img.shape)}, channel first)")
        spatial = tuple(int(s) for s in img.shape[1:])
        nd = len(spatial)
        if nd == 0:
            raise ValueError(f"image of shape {tuple(img.shape)} has no spatial axis")
        grid = self.check_grid(spatial)
        nb = math.prod(grid)
        table = self.combinations_for(nb)
        self._last_b = nb
        k = int(k)
        if not 0 <= k < self.num_combinations:
            raise ValueError(f"combination index {k} is outside range({self.num_combinations})")
        size = tuple(s // g for s, g in zip(spatial, grid))
        sources = table[k].tolist()  # (M, B): output channel c of block b is input channel sources[c][b]
        if isinstance(img, torch.Tensor):
            x = img.as_tensor() if hasattr(img, "as_tensor") else img
            out = torch.empty_like(x)
        else:
            x = np.asarray(img)
            out = np.empty_like(x)
        for b, pos in enumerate(np.ndindex(*grid)):
            block = tuple(slice(p * n, (p + 1) * n) for p, n in zip(pos, size))
            for c in range(m):  # M x B strided block copies, each vectorised over the block's voxels
                out[(c,) + block] = x[(sources[c][b],) + block]
        return convert_to_dst_type(out, img)[0]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if self.label is None:
            raise RuntimeError("no combination drawn yet: call with randomize=True or call randomize() first")
        return self.mix(img, self.label)


class RandModalityBlockMixd(RandomDictWrapper):
    """Dictionary wrapper of :class:`RandModalityBlockMix`.

    One class index is drawn per call and the same combination is applied to every key; the index
    is stored under ``label_key`` as a 0-d ``torch.long`` tensor, which a DataLoader collates into a
    ``(batch,)`` target for ``CrossEntropyLoss``. If none of the keys is present
    (``allow_missing_keys=True``) the data is returned unchanged, without a label.
    """

    backend = RandModalityBlockMix.backend

    def __init__(self, keys: KeysCollection, label_key: str = "mix_class", num_modalities: int = 4,
                 blocks: Sequence[int] | int = 2, num_combinations: int = 100, seed: int = 0,
                 allow_missing_keys: bool = False, spatial_dims: int | None = None,
                 spatial_size: Sequence[int] | None = None):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.mixer = self.inner = RandModalityBlockMix(num_modalities, blocks, num_combinations, seed, spatial_dims,
                                                       spatial_size)
        self.label_key = label_key

    @property
    def combinations(self) -> np.ndarray:
        return self.mixer.combinations

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.mixer.randomize()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d, keys = self.present(data)
        if not keys:
            return d
        k = self.mixer.label
        for key in keys:
            d[key] = self.mixer.mix(d[key], k)
        d[self.label_key] = torch.as_tensor(k, dtype=torch.long)
        return d
