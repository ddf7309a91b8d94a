"""Image-level slice labels for weak supervision (issue 6): derived from the segmentation at data
preparation, pixel labels kept only for evaluation."""

import numpy as np
import pytest

from medssl.data import DataError, brats_axial_slices, brats_cases, image_level_only, make_split, weak_slice_datalist


@pytest.fixture(scope="module")
def split(brats_dir):
    return make_split(brats_cases(brats_dir), label_fraction=1.0, seed=0)


def test_training_slices_carry_image_level_labels_only(split):
    weak = weak_slice_datalist(split, area_threshold=50)
    assert weak["training"] and all("label" not in s for s in weak["training"])
    assert all("label" in s for k in ("validation", "test") for s in weak[k])
    for s in weak["training"][:200]:
        assert s["class"] == float(s["tumour_pixels"] >= 50)
    classes = {s["class"] for s in weak["training"]}
    assert classes == {0.0, 1.0}
    # evaluation slices: the class is the thresholded area of their own mask
    for s in weak["test"]:
        assert s["label"].shape == (1, *s["image"].shape[1:]) and s["tumour_pixels"] == int(s["label"].sum())
    cases = {s["case"] for s in weak["training"]}
    assert cases == {c["case"] for c in split["training"]} and not cases & {s["case"] for s in weak["test"]}


def test_slices_are_axial_brain_slices_of_normalised_volumes(split):
    sl = brats_axial_slices(split["test"][:1], with_pixel_labels=True)
    img = np.stack([s["image"] for s in sl])
    assert img.shape[1] == 4 and all((s["image"][0] != 0).mean() >= 0.05 for s in sl)
    brain = img[:, 0] != 0
    assert abs(img[:, 0][brain].mean()) < 0.5  # z-normalised over the brain of the volume
    assert [s["slice"] for s in sl] == sorted(s["slice"] for s in sl)


def test_image_level_only_refuses_pixel_labels_and_single_class_splits(split):
    weak = weak_slice_datalist(split, area_threshold=50)
    with pytest.raises(DataError, match="carry pixel labels"):
        image_level_only(weak["test"])
    negatives = [s for s in weak["training"] if s["class"] == 0.0]
    with pytest.raises(DataError, match=r"no positive \(tumour\) image-level label"):
        image_level_only(negatives)
    with pytest.raises(DataError, match=r"no negative \(tumour-free\) image-level label"):
        weak_slice_datalist({"training": split["training"]}, area_threshold=0)


def test_modality_channel_is_the_position_of_the_modality_in_a_case(split):
    from medssl.data import BRATS_MODALITIES, modality_channel

    case = split["training"][0]
    for m in BRATS_MODALITIES:
        assert case["image"][modality_channel(m)].endswith(f"_{m}.nii.gz")
    assert modality_channel("t1", ("t2", "t1")) == 1
    with pytest.raises(ValueError, match=r"target_modality must be one of \['flair', 't1', 't1ce', 't2'\], got 'dwi'"):
        modality_channel("dwi")
