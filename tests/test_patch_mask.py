import itertools

import numpy as np
import pytest
import torch

from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, LoadImage

from medssl.transforms import RandPatchMask, RandPatchMaskd


@pytest.fixture(scope="module")
def modalities(brats_dir):
    """The 4 real modalities of the first BraTS case, a (4, H, W, D) MetaTensor."""
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    files = [str(case / f"{case.name}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]
    return LoadImage(image_only=True, ensure_channel_first=True)(files)


@pytest.fixture(scope="module")
def volume(modalities):
    """A (4, 64, 64, 64) crop."""
    return CenterSpatialCrop((64, 64, 64))(modalities)


@pytest.fixture(scope="module")
def slice2d(modalities):
    """An axial slice, (4, 64, 70): 70 = 4 whole patches of 16 and a partial one of 6."""
    return CenterSpatialCrop((64, 70))(modalities[..., modalities.shape[-1] // 2])


def _patch(patch, nd):
    return (patch,) * nd if isinstance(patch, int) else tuple(patch)


def _cells(spatial, patch):
    """Reference: the slices of every cell of the grid in C order (a plain loop, for checking only)."""
    starts = [range(0, s, p) for s, p in zip(spatial, patch)]
    return [tuple(slice(o, o + p) for o, p in zip(origin, patch)) for origin in itertools.product(*starts)]


def _check_grid_mask(mask, grid_mask, patch, n_expected):
    """``mask`` is constant on each cell, equal to ``grid_mask`` there, and ``n_expected`` cells are on."""
    assert grid_mask.dtype == bool and int(grid_mask.sum()) == n_expected
    for cell, on in zip(_cells(mask.shape, patch), grid_mask.reshape(-1)):
        block = mask[cell]
        assert block.size > 0 and (block.all() if on else not block.any())


@pytest.mark.parametrize("which,patch,ratio,grid", [
    ("volume", 16, 0.75, (4, 4, 4)),
    ("volume", (16, 8, 32), 0.3, (4, 8, 2)),
    ("slice2d", 16, 0.4, (4, 5)),  # the last column of cells is 6 voxels wide
    ("slice2d", (7, 16), 0.5, (10, 5)),  # partial last cell on both axes
])
def test_exact_fraction_of_the_grid_is_masked_patch_aligned(request, which, patch, ratio, grid):
    img = request.getfixturevalue(which)
    t = RandPatchMask(patch, mask_ratio=ratio).set_random_state(0)
    out = t(img)
    spatial = tuple(img.shape[1:])
    n_cells = int(np.prod(grid))
    assert t.grid_shape(spatial) == grid and t.grid_mask.shape == grid
    assert t.mask.shape == spatial and t.mask.dtype == bool
    assert t.num_masked(spatial) == round(ratio * n_cells)
    _check_grid_mask(t.mask, t.grid_mask, _patch(patch, len(spatial)), round(ratio * n_cells))
    assert out.shape == img.shape


def test_masked_voxels_hold_fill_value_and_the_rest_is_untouched(volume):
    x = volume.as_tensor()
    t = RandPatchMask(16, mask_ratio=0.5, fill_value=-3.0).set_random_state(1)
    y = t(x)
    m = torch.as_tensor(t.mask)
    assert m.sum() == 32 * 16**3
    assert (y[:, m] == -3.0).all()
    assert torch.equal(y[:, ~m], x[:, ~m])
    assert (x[:, m] != -3.0).any()  # real intensities were replaced, and the input is not modified in place


def test_shared_mask_vs_independent_mask_per_channel(volume):
    x = volume.as_tensor()
    shared = RandPatchMask(16, 0.25).set_random_state(2)
    y = shared(x)
    assert shared.mask.shape == (64, 64, 64)  # one spatial mask for the 4 modalities
    m = torch.as_tensor(shared.mask)
    assert (y[:, m] == 0).all() and torch.equal(y[:, ~m], x[:, ~m])

    per = RandPatchMask(16, 0.25, same_for_all_channels=False).set_random_state(2)
    y = per(x)
    assert per.mask.shape == (4, 64, 64, 64) and per.grid_mask.shape == (4, 4, 4, 4)
    for c in range(4):
        _check_grid_mask(per.mask[c], per.grid_mask[c], (16, 16, 16), 16)
    assert len({per.grid_mask[c].tobytes() for c in range(4)}) > 1  # independent draws
    m = torch.as_tensor(per.mask)
    assert (y[m] == 0).all() and torch.equal(y[~m], x[~m])


def test_numpy_torch_and_metatensor_in_same_type_out_metadata_kept(slice2d):
    assert isinstance(slice2d, MetaTensor)
    outs = {}
    for name, img in {"numpy": slice2d.numpy().copy(), "torch": slice2d.as_tensor().clone(), "meta": slice2d}.items():
        outs[name] = RandPatchMask(16, 0.4).set_random_state(3)(img)
        assert type(outs[name]) is type(img) and outs[name].dtype == img.dtype and outs[name].shape == img.shape
    assert torch.equal(outs["meta"].affine, slice2d.affine)
    assert outs["meta"].meta["filename_or_obj"] == slice2d.meta["filename_or_obj"]
    np.testing.assert_array_equal(outs["numpy"], outs["torch"].numpy())
    np.testing.assert_array_equal(outs["numpy"], outs["meta"].numpy())
    t = RandPatchMask(16, 0.4, fill_value=-1).set_random_state(3)
    ints = t(slice2d.numpy().astype(np.int16))
    assert ints.dtype == np.int16 and (ints == -1).sum() == 4 * t.mask.sum() and (ints[:, t.mask] == -1).all()


def test_reproducible_with_set_random_state(volume):
    a = RandPatchMask(8, 0.6).set_random_state(7)
    b = RandPatchMask(8, 0.6).set_random_state(7)
    assert torch.equal(a(volume), b(volume)) and np.array_equal(a.mask, b.mask)
    first = a.mask.copy()
    a(volume)
    assert not np.array_equal(a.mask, first)  # a new draw per call
    c = RandPatchMask(8, 0.6).set_random_state(8)
    c(volume)
    assert not np.array_equal(c.mask, first)
    b(volume, randomize=False)  # reuse the last draw
    assert np.array_equal(b.mask, first)


def test_ratio_zero_and_prob_zero_are_identity(volume, slice2d):
    for img in (volume, slice2d):
        for t in (RandPatchMask(16, 0.0), RandPatchMask(16, 0.9, prob=0.0)):
            out = t.set_random_state(0)(img)
            assert torch.equal(out, img) and not t.mask.any()
            assert isinstance(out, MetaTensor)


def test_dictionary_applies_one_mask_to_every_key_and_stores_it(volume):
    x = volume
    data = {"image": x, "other": x[:2] * 2.0, "label": "kept"}
    t = RandPatchMaskd(["image", "other"], patch_size=16, mask_ratio=0.5, fill_value=-1.0).set_random_state(4)
    out = t(data)
    m = out["mask"]
    assert isinstance(m, MetaTensor) and m.dtype == torch.float32 and m.shape == (1, 64, 64, 64)
    assert torch.equal(m.affine, x.affine) and out["label"] == "kept"
    assert set(torch.unique(m).tolist()) == {0.0, 1.0} and int(m.sum()) == 32 * 16**3
    on = m[0].bool()
    _check_grid_mask(on.numpy(), t.masker.grid_mask, (16, 16, 16), 32)
    for key, src in (("image", data["image"]), ("other", data["other"])):
        assert (out[key][:, on] == -1.0).all() and torch.equal(out[key][:, ~on], src[:, ~on])
    assert data["image"] is x  # the input dict is not modified

    again = RandPatchMaskd(["image", "other"], 16, 0.5, fill_value=-1.0).set_random_state(4)(data)
    assert torch.equal(again["mask"], m)

    per = RandPatchMaskd(["image"], 16, 0.5, same_for_all_channels=False, mask_key="m")
    out = per.set_random_state(5)({"image": x.numpy()})
    assert isinstance(out["m"], np.ndarray) and out["m"].dtype == np.float32 and out["m"].shape == (4, 64, 64, 64)
    assert (out["image"][out["m"] == 1] == 0).all()
    np.testing.assert_array_equal(out["image"][out["m"] == 0], x.numpy()[out["m"] == 0])

    skip = RandPatchMaskd(["image"], 16, 0.5, prob=0.0)({"image": x})
    assert torch.equal(skip["image"], x) and not skip["mask"].any()
    with pytest.raises(ValueError, match="one mask is applied to every key"):
        RandPatchMaskd(["image", "bad"], 16, 0.5)({"image": x, "bad": x[:, :32]})
    with pytest.raises(ValueError, match="one mask is applied to every key"):
        RandPatchMaskd(["image", "bad"], 16, 0.5, same_for_all_channels=False)({"image": x, "bad": x[:2]})


def test_errors(volume, slice2d):
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            RandPatchMask(16, ratio)
    for patch in (0, (16, 0, 16), -2):
        with pytest.raises(ValueError, match="patch_size must be >= 1"):
            RandPatchMask(patch, 0.5)
    with pytest.raises(ValueError, match="larger than the image"):
        RandPatchMask(65, 0.5)(volume)
    with pytest.raises(ValueError, match="larger than the image"):
        RandPatchMask((16, 71), 0.5)(slice2d)
    with pytest.raises(ValueError, match="has 3 axes but the image has 2 spatial axes"):
        RandPatchMask((16, 16, 16), 0.5)(slice2d)
    with pytest.raises(RuntimeError, match="no mask drawn yet"):
        RandPatchMask(16, 0.5)(slice2d, randomize=False)
