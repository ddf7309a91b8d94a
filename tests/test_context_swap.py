import numpy as np
import pytest
import torch

from monai.transforms import LoadImage, NormalizeIntensity

from medssl.transforms import RandContextSwap, RandContextSwapd


def _patch_mask(shape, corners, patch):
    mask = np.zeros(shape, dtype=int)
    for pair in corners:
        for c in pair:
            mask[tuple(slice(s, s + p) for s, p in zip(c, patch))] += 1
    return mask


@pytest.fixture(scope="module")
def raw_volume(brats_dir):
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    files = [str(case / f"{case.name}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]
    return LoadImage(image_only=True, ensure_channel_first=True)(files)


@pytest.fixture(scope="module")
def volume(raw_volume):
    return NormalizeIntensity(nonzero=True, channel_wise=True)(raw_volume.clone())  # it works in place


@pytest.mark.parametrize("spatial", [(40, 48), (32, 40, 36)])
def test_swap_is_permutation_confined_to_disjoint_patches(spatial):
    rng = np.random.default_rng(0)
    x = rng.random((3, *spatial)).astype(np.float32)  # distinct values: every moved voxel changes
    t = RandContextSwap(patch_size=6, num_swaps=8)
    t.set_random_state(1)
    y = t(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(np.sort(y, axis=None), np.sort(x, axis=None))
    mask = _patch_mask(spatial, t.corners, (6,) * len(spatial))
    assert mask.max() == 1, "patches overlap"
    assert mask.sum() == 2 * 8 * 6 ** len(spatial)
    changed = (y != x).any(0)
    assert not changed[mask == 0].any(), "a voxel outside the swapped patches changed"
    assert changed[mask == 1].all()
    for a, b in t.corners:  # patch a now holds what patch b held, in every channel
        sa = (slice(None),) + tuple(slice(s, s + 6) for s in a)
        sb = (slice(None),) + tuple(slice(s, s + 6) for s in b)
        np.testing.assert_array_equal(y[sa], x[sb])


def test_zero_swaps_is_identity_and_prob_zero_too():
    x = torch.rand(2, 20, 20, 20)
    assert torch.equal(RandContextSwap(4, num_swaps=0)(x), x)
    assert torch.equal(RandContextSwap(4, num_swaps=5, prob=0.0)(x), x)


def test_reproducible_with_set_random_state_and_torch_numpy_agree():
    x = np.random.default_rng(3).random((2, 30, 30, 30)).astype(np.float32)
    a = RandContextSwap(5, 6).set_random_state(7)(x)
    b = RandContextSwap(5, 6).set_random_state(7)(torch.as_tensor(x))
    assert isinstance(b, torch.Tensor)
    np.testing.assert_array_equal(a, b.numpy())
    c = RandContextSwap(5, 6).set_random_state(8)(x)
    assert not np.array_equal(a, c)


def test_real_volume_histogram_preserved_and_foreground_only(volume):
    t = RandContextSwap(patch_size=8, num_swaps=20, foreground_only=True).set_random_state(0)
    y = t(volume)
    assert type(y) is type(volume) and torch.equal(torch.as_tensor(y.affine), torch.as_tensor(volume.affine))
    for c in range(volume.shape[0]):  # per-modality intensity histogram unchanged
        h0 = torch.histc(volume[c].as_tensor(), bins=64, min=-3, max=6)
        h1 = torch.histc(y[c].as_tensor(), bins=64, min=-3, max=6)
        assert torch.equal(h0, h1)
    assert not torch.equal(y, volume)


def test_foreground_patches_sit_in_the_brain_of_a_normalised_crop(raw_volume, volume):
    """As in the bundle: z-scored over the brain (background 0, brain minimum negative), then a 64^3
    crop reaching outside the brain. Every patch centre lies in the brain mask computed from the RAW
    image (any modality > 0), and patches are mostly brain; without ``foreground_only`` a fifth or
    more of the patches would sit mostly in background (the old default mask, "any channel above its
    minimum", selected every voxel of such a crop: that is what ``anywhere`` measures)."""
    brain = (raw_volume > 0).any(0).numpy()
    corner = [max(0, s - 64) for s in brain.shape]  # the far corner of the volume: part brain, part background
    crop = (slice(None),) + tuple(slice(c, c + 64) for c in corner)
    x, mask = volume[crop], brain[crop[1:]]
    assert 0.1 < mask.mean() < 0.9

    def brain_fraction(t):
        t.set_random_state(0)(x)
        return np.array([mask[tuple(slice(c, c + 8) for c in corner)].mean() for corner in t.corners.reshape(-1, 3)])

    t = RandContextSwap(patch_size=8, num_swaps=20, foreground_only=True)
    inside = brain_fraction(t)
    for c in t.corners.reshape(-1, 3) + 4:  # centre, unless clipped to keep the patch inside the crop
        assert mask[tuple(c)] or np.any(c == 4) or np.any(c >= 60)
    anywhere = brain_fraction(RandContextSwap(patch_size=8, num_swaps=20))
    assert inside.mean() > 0.75 and (inside < 0.5).mean() < 0.1
    assert (anywhere < 0.5).mean() >= 0.2 and inside.mean() > anywhere.mean() + 0.1


def test_dict_swaps_every_key_at_the_same_positions():
    x = torch.arange(2 * 24 * 24, dtype=torch.float32).reshape(2, 24, 24)
    d = RandContextSwapd(["a", "b"], patch_size=4, num_swaps=5, corners_key="corners").set_random_state(0)
    out = d({"a": x, "b": x.clone() * 2})
    assert torch.equal(out["b"], out["a"] * 2)
    assert out["corners"].shape == (5, 2, 2)


def test_impossible_placement_raises():
    with pytest.raises(ValueError, match="disjoint patches"):
        RandContextSwap(patch_size=8, num_swaps=10)(np.zeros((1, 16, 16), np.float32) + np.arange(16))
    with pytest.raises(ValueError, match="fit in the image"):
        RandContextSwap(patch_size=32)(np.zeros((1, 16, 16), np.float32))
