import itertools
import math

import numpy as np
import pytest
import torch

from monai.data import DataLoader, MetaTensor
from monai.transforms import LoadImage

from medssl.transforms import RandModalityBlockMix, RandModalityBlockMixd
from medssl.transforms.block_mix import _rank_order, _to_blocks, normalize_blocks

MODALITIES = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def volume(brats_dir) -> MetaTensor:
    """A real BraTS case, 4 modalities, cropped to 64^3 around the brain (MetaTensor, float32)."""
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    img = LoadImage(image_only=True, ensure_channel_first=True)([str(case / f"{case.name}_{m}.nii.gz")
                                                                 for m in MODALITIES])
    assert img.shape[0] == 4 and all(s >= 64 for s in img.shape[1:])
    lo = [(s - 64) // 2 for s in img.shape[1:]]
    crop = img[:, lo[0]:lo[0] + 64, lo[1]:lo[1] + 64, lo[2]:lo[2] + 64]
    assert (crop.reshape(4, -1) != 0).any(1).all(), "every modality should see brain in the crop"
    return crop


@pytest.fixture(scope="module")
def slice2d(volume) -> np.ndarray:
    """The middle axial slice of the crop, (4, 64, 64) numpy."""
    return np.ascontiguousarray(volume.numpy()[..., 32])


def _blocks(x, grid):
    """Reference block list in C order of grid position: each item a (C, *block) array (a loop is fine here)."""
    x = np.asarray(x)
    size = [s // g for s, g in zip(x.shape[1:], grid)]
    out = []
    for pos in itertools.product(*(range(g) for g in grid)):
        out.append(x[(slice(None),) + tuple(slice(p * s, (p + 1) * s) for p, s in zip(pos, size))])
    return out


def _as_numpy(y):
    return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


@pytest.mark.parametrize("dims,blocks,kind", [
    (3, 2, "numpy"), (3, (2, 2, 1), "meta"), (3, (4, 1, 2), "torch"), (2, (2, 2), "numpy"), (2, 4, "meta"),
])
def test_every_output_block_is_the_tabled_modality_block(volume, slice2d, dims, blocks, kind):
    base = volume.numpy() if dims == 3 else slice2d
    x = {"numpy": base, "torch": torch.as_tensor(base),
         "meta": volume if dims == 3 else MetaTensor(torch.as_tensor(base), affine=volume.affine)}[kind]
    t = RandModalityBlockMix(num_modalities=4, blocks=blocks, num_combinations=50).set_random_state(3)
    labels = set()
    for _ in range(4):
        y = t(x)
        labels.add(t.label)
        assert isinstance(t.label, int) and 0 <= t.label < 50
        assert type(y) is type(x) and y.shape == x.shape and y.dtype == x.dtype
        if kind == "meta":
            assert torch.equal(y.affine, x.affine)
        grid = (blocks,) * dims if isinstance(blocks, int) else blocks
        table = t.combinations[t.label]
        assert table.shape == (4, math.prod(grid))
        xb, yb = _blocks(base, grid), _blocks(_as_numpy(y), grid)
        for b in range(len(xb)):
            for c in range(4):
                assert np.array_equal(yb[b][c], xb[b][table[c, b]]), (c, b)
        assert np.array_equal(_as_numpy(t.mix(base, t.label)), _as_numpy(y))  # numpy and torch agree
    assert len(labels) > 1
    assert np.array_equal(_as_numpy(x), base), "input modified"


def test_tables_are_distinct_valid_and_fixed_by_seed():
    for blocks, dims in [((2, 2), 2), (2, 3)]:  # B = 4 (enumerated), B = 8 (rejection sampling)
        t = RandModalityBlockMix(4, blocks, 200, seed=0, spatial_dims=dims)
        tab = t.combinations
        nb = t.num_blocks()
        assert nb == (4 if dims == 2 else 8) and tab.shape == (200, 4, nb) and tab.dtype == np.int64
        assert (np.sort(tab, axis=1) == np.arange(4)[None, :, None]).all(), "a column is not a permutation"
        assert len(np.unique(tab.reshape(200, -1), axis=0)) == 200, "combinations repeat"
        other = RandModalityBlockMix(4, blocks, 200, seed=0, spatial_dims=dims).set_random_state(99)
        other(np.zeros((4,) + (8,) * dims, np.float32))
        assert np.array_equal(other.combinations, tab), "the table must not depend on the random state"
        assert not np.array_equal(RandModalityBlockMix(4, blocks, 200, seed=1, spatial_dims=dims).combinations, tab)
    # small sets are exhausted exactly: all 2 and all 6 channel permutations of a single block
    assert sorted(map(tuple, RandModalityBlockMix(2, 1, 2).combinations[:, :, 0])) == [(0, 1), (1, 0)]
    full = RandModalityBlockMix(3, (1, 1), 6).combinations[:, :, 0]
    assert sorted(map(tuple, full)) == sorted(itertools.permutations(range(3)))
    # an int block count: B follows the input's dimensionality, one table per B
    t = RandModalityBlockMix(4, 2, 30)
    with pytest.raises(ValueError, match="spatial_dims"):
        t.combinations
    assert t.num_blocks(2) == 4 and t.num_blocks(3) == 8
    t(np.zeros((4, 8, 8), np.float32))
    assert t.combinations.shape == (30, 4, 4)
    t(np.zeros((4, 8, 8, 8), np.float32))
    assert t.combinations.shape == (30, 4, 8)


def test_label_is_recoverable_from_the_mixed_real_image(volume, slice2d):
    for x, blocks in [(slice2d, (2, 2)), (volume.numpy(), (2, 2, 1))]:
        t = RandModalityBlockMix(4, blocks, 40).set_random_state(5)
        mixes = np.stack([t.mix(x, k) for k in range(40)])
        flat = mixes.reshape(40, -1)
        assert len({row.tobytes() for row in flat}) == 40, "two classes produce the same image"
        for _ in range(5):
            y = t(x)
            hits = np.flatnonzero((flat == y.reshape(1, -1)).all(1))
            assert hits.tolist() == [t.label]
        y2 = t(x, randomize=False)  # reuses the last draw
        assert np.array_equal(y2, y)


def test_dictionary_version_same_combination_on_every_key_and_long_label(volume, slice2d):
    x = volume
    data = {"image": x, "copy": -2 * x.numpy() + 1, "other": "kept"}
    t = RandModalityBlockMixd(["image", "copy"], num_modalities=4, blocks=(2, 2, 2), num_combinations=100)
    t.set_random_state(11)
    out = t(data)
    k = out["mix_class"]
    assert isinstance(k, torch.Tensor) and k.dtype == torch.long and k.ndim == 0 and 0 <= int(k) < 100
    assert int(k) == t.mixer.label
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, x.affine)
    assert np.array_equal(out["image"].numpy(), t.mixer.mix(x.numpy(), int(k)))
    assert np.array_equal(out["copy"], -2 * out["image"].numpy() + 1), "keys got different combinations"
    assert out["other"] == "kept" and data["image"] is x
    # reproducible draws with set_random_state; a different seed draws another sequence
    small = {"image": slice2d}

    def draws(seed, n=200, k=10):
        td = RandModalityBlockMixd("image", blocks=(2, 2), num_combinations=k).set_random_state(seed)
        return [int(td(small)["mix_class"]) for _ in range(n)]

    a = draws(42)
    assert a == draws(42) and a != draws(43)
    counts = np.bincount(a, minlength=10)
    assert len(counts) == 10 and counts.min() >= 8 and counts.max() <= 35, counts  # roughly uniform
    assert len(set(draws(0, 200, 100))) > 70
    # the label collates to a (batch,) long target for CrossEntropyLoss
    td = RandModalityBlockMixd("image", blocks=(2, 2), num_combinations=10).set_random_state(0)
    batch = next(iter(DataLoader([td(small) for _ in range(4)], batch_size=4)))
    assert batch["mix_class"].shape == (4,) and batch["mix_class"].dtype == torch.long
    loss = torch.nn.CrossEntropyLoss()(torch.zeros(4, 10), batch["mix_class"])
    assert torch.isclose(loss, torch.log(torch.tensor(10.0)))
    # allow_missing_keys: nothing present -> unchanged, no label
    assert RandModalityBlockMixd("absent", allow_missing_keys=True)({"a": 1}) == {"a": 1}


def test_errors(volume):
    x = volume.numpy()
    with pytest.raises(ValueError, match=r"num_modalities=4.*got 3"):
        RandModalityBlockMix(4, 2)(x[:3])
    with pytest.raises(ValueError, match=r"block grid \(2, 2, 3\) does not divide the crop \(64, 64, 64\)"):
        RandModalityBlockMix(4, (2, 2, 3))(x)
    with pytest.raises(ValueError, match=r"block grid \(2, 2, 3\) does not divide the crop \(64, 64, 64\)"):
        RandModalityBlockMixd("image", blocks=(2, 2, 3), spatial_size=(64, 64, 64))  # at construction
    with pytest.raises(ValueError, match=r"num_combinations=3 exceeds the 2 possible"):
        RandModalityBlockMix(2, 1, 3)
    with pytest.raises(ValueError, match=r"num_combinations=577 exceeds the 576 possible"):
        RandModalityBlockMix(4, (2, 1), 577)
    RandModalityBlockMix(4, (2, 1), 576)  # exactly all of them is fine
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        RandModalityBlockMix(4, 0)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        RandModalityBlockMix(4, (2, 0, 2))
    with pytest.raises(ValueError, match="3 spatial axes"):
        RandModalityBlockMix(4, (2, 2))(x)
    with pytest.raises(ValueError, match="outside range"):
        RandModalityBlockMix(4, 2, 10).mix(x, 10)


def test_each_block_position_keeps_its_multiset_of_values(volume, slice2d):
    for x, blocks in [(volume.numpy(), 2), (slice2d, (4, 2))]:
        grid = (blocks,) * (x.ndim - 1) if isinstance(blocks, int) else blocks
        t = RandModalityBlockMix(4, blocks, 100).set_random_state(1)
        xb = _blocks(x, grid)
        for _ in range(3):
            yb = _blocks(t(x), grid)
            for b in range(len(xb)):
                np.testing.assert_array_equal(np.sort(yb[b], axis=None), np.sort(xb[b], axis=None))
                # and per channel: output block = some input modality's block, each modality once
                src = [next(m for m in range(4) if np.array_equal(yb[b][c], xb[b][m])) for c in range(4)]
                assert sorted(src) == [0, 1, 2, 3]


# --- normalize_blocks: the per-block intensity shortcut removed -------------------------------------------------

def _synthetic(dims, seed=0):
    """Four 'modalities' with different intensity distributions (shifted, skewed, heavy-tailed, quantised) on
    a shared foreground ball, background 0: (4, *spatial) float32, every spatial size 16."""
    rng = np.random.default_rng(seed)
    shape = (16,) * dims
    grid = np.stack(np.meshgrid(*[np.arange(s) - 7.5 for s in shape], indexing="ij"))
    fg = (grid ** 2).sum(0) < 7.0 ** 2
    ramp = grid[0] / 8.0  # shared anatomy: every channel a different function of it plus noise
    chans = [ramp + rng.normal(0, 0.1, shape) - 1.0,
             np.exp(ramp + rng.normal(0, 0.3, shape)),
             np.round(3 * np.tanh(-ramp) + rng.normal(0, 0.5, shape)),  # quantised: many ties
             rng.standard_t(2, shape) + 2.0]
    x = np.stack(chans).astype(np.float32) * fg
    x[2][fg & (rng.random(shape) < 0.05)] = 0.0  # some foreground voxels zero in one channel only
    return x


def _check_equalised(y, grid, x=None, table=None):
    """Per block: identical sorted foreground values in every channel, background 0; with ``x`` and the
    combination ``table[k]``, channel c of block b is a non-decreasing function of input modality table[c, b]."""
    yb = _blocks(_as_numpy(y), grid)
    xb = _blocks(x, grid) if x is not None else None
    for b, blk in enumerate(yb):
        fg = (blk != 0).any(0) if xb is None else (xb[b] != 0).any(0)
        assert (blk[:, ~fg] == 0).all(), "background changed"
        ref = np.sort(blk[0][fg])
        for c in range(blk.shape[0]):
            np.testing.assert_array_equal(np.sort(blk[c][fg]), ref)
            if xb is not None:
                src = xb[b][table[c, b]][fg]
                order = np.lexsort((blk[c][fg], src))  # by source value, ties (ranked in any order) by output
                assert (np.diff(blk[c][fg][order]) >= 0).all(), "ranks not kept"


@pytest.mark.parametrize("dims,blocks", [(2, (2, 2)), (3, (2, 2, 1)), (3, 2), (2, (4, 1))])
def test_histogram_normalisation_gives_every_channel_of_a_block_the_same_values(dims, blocks):
    x = _synthetic(dims)
    grid = (blocks,) * dims if isinstance(blocks, int) else blocks
    plain = RandModalityBlockMix(4, blocks, 50, spatial_dims=dims)
    t = RandModalityBlockMix(4, blocks, 50, spatial_dims=dims, normalize_blocks="histogram").set_random_state(2)
    before = _blocks(plain.mix(x, 0), grid)
    assert any(not np.array_equal(np.sort(b[0][b[0] != 0]), np.sort(b[1][b[1] != 0])) for b in before)
    for _ in range(3):
        y = t(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        _check_equalised(y, grid, x, t.combinations[t.label])
        # the same as normalising the plain mix (or the input first: it commutes with the mixing)
        np.testing.assert_array_equal(y, normalize_blocks(plain.mix(x, t.label), grid))
        np.testing.assert_allclose(y, plain.mix(normalize_blocks(x, grid), t.label), rtol=1e-6, atol=1e-6)
        assert np.array_equal(t.mix(x, t.label), y), "not deterministic"
    assert np.array_equal(x, _synthetic(dims)), "input modified"


def test_histogram_normalisation_on_real_crops_keeps_type_and_label_semantics(volume, slice2d):
    for x, blocks in [(volume, (2, 2, 1)), (slice2d, (2, 2)), (torch.as_tensor(slice2d), (2, 2))]:
        base = _as_numpy(x).copy()
        t = RandModalityBlockMix(4, blocks, 40, normalize_blocks="histogram").set_random_state(5)
        y = t(x)
        assert type(y) is type(x) and y.dtype == x.dtype
        if isinstance(x, MetaTensor):
            assert torch.equal(y.affine, x.affine)
        _check_equalised(y, blocks, base, t.combinations[t.label])
        n = 40 if x.ndim == 3 else 8  # (a 2D slice: all classes)
        mixes = np.stack([_as_numpy(t.mix(x, k)) for k in range(n)]).reshape(n, -1)
        assert len({row.tobytes() for row in mixes}) == n, "two classes produce the same image"
        assert np.array_equal(_as_numpy(x), base)
    # the dictionary version passes the option on and still labels every key with the same combination
    d = RandModalityBlockMixd("image", "label", blocks=(2, 2, 1), normalize_blocks="histogram").set_random_state(1)
    out = d({"image": volume})
    _check_equalised(out["image"], (2, 2, 1), volume.numpy(), d.combinations[int(out["label"])])


def test_standardize_normalisation_and_bad_modes(volume):
    x = volume.numpy()
    y = RandModalityBlockMix(4, (2, 2, 1), 10, normalize_blocks="standardize").set_random_state(0)(x)
    for blk in _blocks(y, (2, 2, 1)):
        fg = (blk != 0).any(0)
        np.testing.assert_allclose(blk[:, fg].mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(blk[:, fg].std(1), 1, atol=1e-4)
    assert np.array_equal(normalize_blocks(x, (2, 2, 1), None), x)
    with pytest.raises(ValueError, match="normalize_blocks must be one of"):
        RandModalityBlockMix(4, 2, 10, normalize_blocks="zscore")
    with pytest.raises(TypeError, match="floating-point"):
        normalize_blocks(np.ones((4, 8, 8), np.int32), (2, 2))


def test_the_cpu_radix_ranks_equal_a_stable_sort():
    """On the CPU the ranks come from a 2-pass radix sort of the float keys; elsewhere from torch.sort: same order
    (ties, negative values, -0.0 and background included)."""
    x = torch.as_tensor(_synthetic(3))
    x[1, :2] = -0.0
    xb = _to_blocks(x, (2, 2, 1))
    fg = (xb != 0).any(1, keepdim=True)
    assert torch.equal(_rank_order(xb, fg), _rank_order(xb.double(), fg))
