"""Slice-level label budgets (``label_unit`` ``"slice"``) on the real BraTS volumes: a label fraction labels that
share of the axial slices of ALL training volumes (dfr_barlow's BraTS-slices benchmark), not whole volumes."""

import json

import numpy as np
import pytest

from medssl.data import (DataError, all_training, axial_brain_slices, brats_cases, datalist_digest, label_slices,
                         labelled, make_fold, make_split, unlabelled)


@pytest.fixture(scope="module")
def cases(brats_dir):
    return brats_cases(brats_dir)


def slices_of(dl):
    return {(c["case"], z) for c in dl["training"] for z in c.get("labelled_slices", [])}


@pytest.mark.parametrize("fold", [0, 2])
def test_a_fraction_labels_that_share_of_the_slices_of_every_training_volume(cases, fold):
    folded = make_fold(cases, fold, 3, 0.1, seed=0, val_fraction=0.15)  # dfr_barlow's brats layout
    dl = label_slices(folded, 0.1)
    train = [c for c in dl["training"] if "label" in c]
    assert len(train) == 8 and dl["label_unit"] == "slice"
    brain = {c["case"]: set(axial_brain_slices(c["image"][0])) for c in train}
    total = sum(map(len, brain.values()))
    assert total > 400  # 8 volumes of about 65 brain slices each: not a count of volumes
    chosen = slices_of(dl)
    assert len(chosen) == max(1, round(0.1 * total))
    # spread over all training volumes (round robin: per-volume counts differ by at most one)
    counts = [len(c.get("labelled_slices", [])) for c in train]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert all(c["labelled"] == bool(c.get("labelled_slices")) for c in dl["training"])
    assert all(z in brain[case] for case, z in chosen)  # slices that show brain, as RAS axial indices
    # never a validation or test volume; the three sets are those of the case-level fold
    held_out = {c["case"] for k in ("validation", "test") for c in dl[k]}
    assert held_out and not held_out & {case for case, _ in chosen}
    assert not any("labelled_slices" in c or "labelled" in c for k in ("validation", "test") for c in dl[k])
    assert {k: [c["case"] for c in dl[k]] for k in ("training", "validation", "test")} == \
        {k: [c["case"] for c in folded[k]] for k in ("training", "validation", "test")}


def test_the_selection_is_seeded_and_nested_across_fractions(cases):
    def at(f, seed=0):
        return slices_of(label_slices(make_fold(cases, 1, 3, f, seed=0, val_fraction=0.15), f, seed=seed))

    assert at(0.1) == at(0.1)
    assert at(0.1, seed=1) != at(0.1)
    assert at(0.1) < at(0.2) < at(1.0)
    assert len(at(0.001)) == 1  # at least one labelled slice
    a = label_slices(make_fold(cases, 1, 3, 0.1, seed=0, val_fraction=0.15), 0.1)
    b = label_slices(make_fold(cases, 1, 3, 0.1, seed=0, val_fraction=0.15), 0.1, seed=1)
    assert datalist_digest(a) != datalist_digest(b)  # a resumed run with another selection is refused


def test_only_slice_aware_stages_take_the_labels_and_the_rest_is_unlabelled_data(cases):
    dl = label_slices(make_split(cases, 0.1, seed=0), 0.1)
    with pytest.raises(DataError, match="labels only some axial slices"):
        labelled(dl)  # a 3D stage would use the whole volume's labels
    lab = labelled(dl, slice_labels=True)
    assert lab and all(c["labelled_slices"] for c in lab)
    assert {c["case"] for c in lab} <= {c["case"] for c in unlabelled(dl)}  # their other slices
    assert not any("label" in c or "labelled_slices" in c for c in unlabelled(dl) + all_training(dl))
    volume_level = make_split(cases, 0.1, seed=0)
    assert labelled(volume_level) == labelled(volume_level, slice_labels=True)


def test_select_slices_keeps_exactly_the_labelled_ras_slices(cases):
    from monai.transforms import Compose, LoadImaged, Orientationd

    from medssl.transforms import SelectSlicesd

    case = next(c for c in label_slices(make_split(cases, 0.1, seed=0), 0.1)["training"] if c.get("labelled_slices"))
    load = Compose([LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True),
                    Orientationd(["image", "label"], axcodes="RAS")])
    full = load({"image": case["image"], "label": case["label"]})
    kept = SelectSlicesd(["image", "label"])(load(case))
    z = case["labelled_slices"]
    assert "labelled_slices" not in kept and kept["label"].shape[-1] == len(z)
    assert np.array_equal(np.asarray(kept["label"]), np.asarray(full["label"])[..., z])
    assert np.array_equal(np.asarray(kept["image"]), np.asarray(full["image"])[..., z])


def test_dfr_barlow_brats_benchmark_writes_slice_level_datalists(cases, brats_dir, tmp_path):
    from medssl.apps.benchmark import load_spec, plan

    spec = load_spec("dfr_barlow")
    _, _, split, folds = spec.for_layout("brats")
    assert split["label_unit"] == "slice" and spec.for_layout("nuclei")[2].get("label_unit", "case") == "case"
    plan(spec, cases, tmp_path, [0.1], folds, 0, 0.15, "smoke", ["baseline"], str(brats_dir), split["label_unit"])
    for fold in range(folds):
        dl = json.loads((tmp_path / f"fold{fold}" / "datalist_f0.1.json").read_text())
        train = [c for c in dl["training"] if "label" in c]
        assert sum(c["labelled"] for c in train) >= len(train) - 1 and 40 <= len(slices_of(dl)) <= 60
