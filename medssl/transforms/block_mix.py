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


BLOCK_NORMALIZATIONS = ("histogram", "standardize", None)


def _to_blocks(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(M, *spatial)`` -> ``(B, M, n)``: the voxels of every block, blocks in C order of grid position."""
    m, spatial = x.shape[0], x.shape[1:]
    size = [s // g for s, g in zip(spatial, grid)]
    nd = len(grid)
    split = x.reshape(m, *[v for g, s in zip(grid, size) for v in (g, s)])  # (M, g0, s0, g1, s1, ...)
    order = [2 * i + 1 for i in range(nd)] + [0] + [2 * i + 2 for i in range(nd)]
    return split.permute(order).reshape(math.prod(grid), m, math.prod(size))


def _from_blocks(xb: torch.Tensor, grid: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`_to_blocks`."""
    nd = len(grid)
    size = [s // g for s, g in zip(spatial, grid)]
    m = xb.shape[1]
    split = xb.reshape(*grid, m, *size)  # (g0, g1, ..., M, s0, s1, ...)
    order = [nd] + [v for i in range(nd) for v in (i, nd + 1 + i)]
    return split.permute(order).reshape(m, *spatial)


_TIE_BREAK: dict[int, np.ndarray] = {}


def _tie_break(n: int) -> np.ndarray:
    """A fixed pseudo-random permutation of ``range(n)`` (seed 0, cached): the order in which equal values are
    ranked, so that ties (intensities are quantised: a few hundred levels per modality) get their reference
    values in no spatial order rather than in raster order, which would add a ramp along the first axis."""
    if n not in _TIE_BREAK:
        _TIE_BREAK[n] = np.random.default_rng(0).permutation(n)
    return _TIE_BREAK[n]


def _rank_order(xb: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` -> for every rank ``i`` the index of the voxel holding the ``i``-th smallest value along the
    last axis, foreground (``fg``, broadcast) first, ties in the fixed :func:`_tie_break` order. On the CPU an
    LSD radix sort of the order-preserving 32-bit keys of the values (two stable 16-bit passes, numpy's
    radix sort: about 3x faster than a comparison argsort of floats), elsewhere ``torch.sort(stable=True)``;
    both give the same order."""
    n = xb.shape[-1]
    perm = _tie_break(n)
    if xb.device.type != "cpu" or xb.dtype != torch.float32:
        key = torch.where(fg, xb + 0.0, torch.inf)[..., torch.as_tensor(perm, device=xb.device)]
        return torch.as_tensor(perm, device=xb.device)[torch.sort(key, dim=-1, stable=True).indices]
    bits = np.ascontiguousarray((xb + 0.0).numpy()).view(np.uint32)  # + 0.0: -0.0 -> +0.0, as torch.sort sees it
    key = bits ^ ((bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))  # unsigned order = float order
    key[~np.broadcast_to(fg.numpy(), key.shape)] = np.uint32(0xFFFFFFFF)  # background ranks last
    rows = key.reshape(-1, n)
    offset = (np.arange(rows.shape[0]) * n)[:, None]

    def take(a, i):  # a[r, i[r, j]] for every row r: a flat take, faster than take_along_axis
        return a.reshape(-1).take(i + offset).reshape(i.shape)

    # LSD radix: stable by the low 16 bits, then stable by the high 16 bits; starting from the tie-break order
    lo, hi = (rows & 0xFFFF).astype(np.uint16), (rows >> 16).astype(np.uint16)
    voxels = perm.take(np.argsort(lo.take(perm, axis=-1), axis=-1, kind="stable"))
    voxels = take(voxels, np.argsort(take(hi, voxels), axis=-1, kind="stable"))
    return torch.from_numpy(voxels.reshape(key.shape))


def normalize_blocks(img: NdarrayOrTensor, grid: Sequence[int], mode: str | None = "histogram") -> NdarrayOrTensor:
    """Make every block's intensity distribution the same in all channels, over the block's foreground.

    ``img`` is channel-first ``(M, *spatial)`` (2D or 3D, numpy or torch, any device); ``grid`` the blocks per
    spatial axis (it must divide the spatial shape). The foreground of a block is its voxels non-zero in any
    channel (after ``NormalizeIntensityd(nonzero=True)`` the background is exactly 0); the background stays 0.

    - ``"histogram"``: in every block each channel's foreground values are replaced, rank for rank, by a
      reference shared by the block's channels: the mean over the M channels of their ``i``-th smallest
      foreground value (the quantile-averaged distribution, the 1D Wasserstein barycentre of the M
      histograms). Afterwards every channel of a block holds exactly the same multiset of values (the
      same sorted foreground values) and only their spatial arrangement differs. Ties are ranked in a
      fixed pseudo-random order of the voxels (deterministic, :func:`_tie_break`).
    - ``"standardize"``: each channel's foreground values in the block get zero mean and unit variance
      (the shape of the distribution, skew included, stays).
    - ``None``: ``img`` unchanged.

    The result does not depend on the order of the channels (each channel is mapped to a reference that all
    channels share), so it commutes with a per-block permutation of the channels (the block mixing).
    Returns a new array of the same kind, dtype and device (metadata kept)."""
    if mode is None:
        return img
    if mode not in BLOCK_NORMALIZATIONS:
        raise ValueError(f"normalize_blocks must be one of {list(BLOCK_NORMALIZATIONS)}, got {mode!r}")
    x = img.as_tensor() if hasattr(img, "as_tensor") else img
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise TypeError(f"normalize_blocks needs a floating-point image, got {x.dtype}")
    spatial = tuple(int(s) for s in x.shape[1:])
    grid = tuple(int(g) for g in grid)
    if len(grid) != len(spatial) or any(s % g for s, g in zip(spatial, grid)):
        raise ValueError(f"block grid {grid} does not divide the image {spatial}")
    xb = _to_blocks(x, grid)  # (B, M, n), a copy
    nb, m, n = xb.shape
    fg = (xb != 0).any(1, keepdim=True)  # (B, 1, n): the block's foreground, shared by its channels
    if mode == "standardize":
        cnt = fg.sum(-1, keepdim=True).clamp_min(1)
        mean = torch.where(fg, xb, 0).sum(-1, keepdim=True) / cnt
        var = torch.where(fg, (xb - mean) ** 2, 0).sum(-1, keepdim=True) / cnt
        out = torch.where(fg, (xb - mean) / var.sqrt().clamp_min(1e-6), 0)
    else:
        order = _rank_order(xb, fg)  # (B, M, n): the voxel of each rank, the block's foreground first
        ref = torch.gather(xb, -1, order).mean(1, keepdim=True)  # (B, 1, n): mean i-th value over channels
        out = torch.zeros_like(xb).scatter_(-1, order, ref.expand(nb, m, n))
        out = torch.where(fg, out, 0)  # the ranks past the foreground hold background
    return convert_to_dst_type(_from_blocks(out.to(x.dtype), grid, spatial), img)[0]


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
        normalize_blocks: ``"histogram"``, ``"standardize"`` or ``None`` (default: the paper's plain
            copies): after mixing, make every block's intensity distribution the same in all channels
            (:func:`normalize_blocks`). Why: with plain copies the combination can be read off per-block
            intensity statistics without any spatial learning, because each modality has its own
            histogram (z-normalised FLAIR, T1, T1ce and T2 differ in skew, tails and tumour brightness).
            Measured on the BraTS sample (64^3 crops, blocks 2x2x1, K = 100, chance 0.01): a linear probe
            of per-block intensity histograms named the combination of 30/30 held-out crops, more often than
            the trained network (0.40). ``"histogram"`` maps every channel of a block, rank for rank, onto
            a reference shared by the block's channels, so all channels of a block hold the same values and
            only where they lie (the anatomy, the modality's contrast between tissues) tells the modalities
            apart; the same probe is then at chance, 0/30 (``docs/methods/slem.md``). ``"standardize"``
            (mean and standard deviation per block and channel) keeps the shape of each histogram: the
            probe still named 30/30.

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
    ``benchmarks/bench_block_mix.py``). With ``normalize_blocks`` the copies are then normalised per
    block (all at once, vectorised: one sort per block and channel), so output block ``b`` of channel
    ``c`` holds the spatial pattern (the ranks) of that input block, not its values.

    With an int ``blocks`` B depends on the number of spatial axes (``blocks**spatial_dims``); one
    table per B is kept, and :attr:`combinations` is the table of the most recent input.
    """

    backend = ["torch", "numpy"]

    def __init__(self, num_modalities: int = 4, blocks: Sequence[int] | int = 2, num_combinations: int = 100,
                 seed: int = 0, spatial_dims: int | None = None, spatial_size: Sequence[int] | None = None,
                 normalize_blocks: str | None = None):
        RandomizableTransform.__init__(self, prob=1.0)
        if normalize_blocks not in BLOCK_NORMALIZATIONS:
            raise ValueError(f"normalize_blocks must be one of {list(BLOCK_NORMALIZATIONS)}, got {normalize_blocks!r}")
        self.normalize_blocks = normalize_blocks
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
        if self.normalize_blocks is not None:  # per block and channel-symmetric: commutes with the mixing
            out = normalize_blocks(out, grid, self.normalize_blocks)
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
                 spatial_size: Sequence[int] | None = None, normalize_blocks: str | None = None):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.mixer = self.inner = RandModalityBlockMix(num_modalities, blocks, num_combinations, seed, spatial_dims,
                                                       spatial_size, normalize_blocks)
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
