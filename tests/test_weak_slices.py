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


def _tagged_copy(case_dir, dst, flip_k=False):
    """A copy of a real BraTS case without its seg, tagged from that seg (tumour: >= 50 pixels; tumour-free: none),
    its volumes optionally stored head-foot reversed (the affine says so: the same anatomy)."""
    import json

    import nibabel as nib

    out = dst / case_dir.name
    out.mkdir(parents=True)
    seg = np.asarray(nib.load(str(case_dir / f"{case_dir.name}_seg.nii.gz")).dataobj) > 0
    for p in case_dir.glob("*.nii.gz"):
        if p.name.endswith("_seg.nii.gz"):
            continue
        img = nib.load(str(p))
        data, affine = np.asarray(img.dataobj), img.affine.copy()
        if flip_k:
            data = data[..., ::-1]
            affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, data.shape[2] - 1], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(out / p.name))
    area = seg.sum(axis=(0, 1))
    if flip_k:
        area = area[::-1]
    tags = {"tumour_slices": np.flatnonzero(area >= 50).tolist(), "tumour_free_slices": np.flatnonzero(area == 0).tolist()}
    (out / f"{case_dir.name}_tags.json").write_text(json.dumps(tags))
    return out, tags


@pytest.mark.parametrize("flip_k", [False, True])
def test_annotator_slice_tags_train_like_the_labels_derived_from_a_segmentation(brats_dir, tmp_path, flip_k):
    """A study with no segmentation but a <case>_tags.json (issue 15: image-level tags from MONAI Label) gives
    exactly its tagged slices, each with the class its tag says: the same images and classes as the slices
    derived from the real segmentation, also when the file stores the head-foot axis reversed."""
    from medssl.data import bundle_datalist, training_slices

    src = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    _, tags = _tagged_copy(src, tmp_path / "data", flip_k)
    datalist = bundle_datalist(str(tmp_path / "data"), val_fraction=0.0, test_fraction=0.0)
    case = datalist["training"][0]
    assert case["labelled"] is False and "label" not in case and case["tags"].endswith("_tags.json")
    got = {s["slice"]: s for s in training_slices(datalist, "image")}
    derived = {s["slice"]: s for s in brats_axial_slices(brats_cases(brats_dir)[:1], min_brain_fraction=0.0)}
    assert len(got) == len(tags["tumour_slices"]) + len(tags["tumour_free_slices"])
    assert {z for z, s in got.items() if s["class"] == 1.0} == {z for z, s in derived.items() if s["tumour_pixels"] >= 50}
    assert {z for z, s in got.items() if s["class"] == 0.0} == {z for z, s in derived.items() if s["tumour_pixels"] == 0}
    for z, s in got.items():
        np.testing.assert_allclose(s["image"], derived[z]["image"], atol=1e-5)
    # the supervised variant never trains on a study that has tags but no segmentation
    with pytest.raises(DataError, match="no labelled case"):
        training_slices(datalist, "pixel")


@pytest.mark.parametrize("tags, expected", [
    ('{"tumour_slices": [3, 999]}', r"\[999\] outside the study's \d+ axial slices"),
    ('{"tumour_slices": [3], "tumour_free_slices": [3]}', r"slices \[3\] are tagged both"),
    ('{"tumor": [3]}', r"found \['tumor'\]; expected a JSON object"),
    ('{"tumour_slices": "3"}', "expected a list of integer slice indices"),
    ("[3", "not valid JSON"),
])
def test_bad_slice_tags_are_refused_before_training_naming_the_file(brats_dir, tmp_path, tags, expected):
    from medssl.data import bundle_datalist

    src = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    out, _ = _tagged_copy(src, tmp_path / "data")
    (out / f"{out.name}_tags.json").write_text(tags)
    with pytest.raises(DataError, match=expected) as e:
        bundle_datalist(str(tmp_path / "data"), val_fraction=0.0, test_fraction=0.0)
    assert f"{out.name}_tags.json" in str(e.value) and len(e.value.problems) == 1
