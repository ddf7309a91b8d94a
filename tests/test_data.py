import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medssl.data import (DataError, DownloadError, brats_cases, bundle_datalist, check_dataset_dir, labelled,
                         load_datalist, make_split, nuclei_cases, write_datalist)
from medssl.data import sample

from conftest import DAMAGES, case_file


def test_real_sets_pass_the_check(brats_dir, nuclei_dir):
    assert check_dataset_dir(brats_dir) == []
    assert len(brats_cases(brats_dir)) == 15
    cases = nuclei_cases(nuclei_dir)
    assert len(cases) == 664
    from medssl.data import check_cases

    check_cases(cases[:20], "nuclei")


def test_split_is_seeded_disjoint_and_labelled_cases_nest(brats_dir):
    cases = brats_cases(brats_dir)
    splits = {f: make_split(cases, label_fraction=f, seed=1) for f in (0.1, 0.2, 1.0)}
    s = splits[0.1]
    names = [c["case"] for k in ("training", "validation", "test") for c in s[k]]
    assert sorted(names) == sorted(c["case"] for c in cases)  # a partition
    assert (len(s["training"]), len(s["validation"]), len(s["test"])) == (9, 2, 4)
    lab = {f: {c["case"] for c in labelled(sp)} for f, sp in splits.items()}
    assert len(lab[0.1]) == 1 and len(lab[0.2]) == 2 and len(lab[1.0]) == 9
    assert lab[0.1] <= lab[0.2] <= lab[1.0]
    for f in splits:  # the sets do not depend on the label fraction
        assert [c["case"] for c in splits[f]["test"]] == [c["case"] for c in s["test"]]
    assert make_split(cases, 0.1, seed=1) == s
    assert [c["case"] for c in make_split(cases, 0.1, seed=2)["test"]] != [c["case"] for c in s["test"]]
    tiny = make_split(cases, label_fraction=0.01, seed=0)
    assert sum(c["labelled"] for c in tiny["training"]) == 1  # at least one labelled case


def test_folds_test_every_case_once_with_nested_labels(brats_dir):
    """Cross-validation: over the folds every real case is a test case exactly once; validation and
    training come from the other folds; labelled cases nest across fractions; the same seed gives the
    same folds."""
    from medssl.data import make_fold

    cases = brats_cases(brats_dir)
    folds = [make_fold(cases, f, 5, 1.0, seed=0) for f in range(5)]
    tested = [c["case"] for d in folds for c in d["test"]]
    assert sorted(tested) == sorted(c["case"] for c in cases)
    for f, d in enumerate(folds):
        names = [{c["case"] for c in d[k]} for k in ("training", "validation", "test")]
        assert sum(map(len, names)) == len(cases) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        assert len(d["validation"]) >= 1 and len(d["test"]) == 3
        lab = {x: {c["case"] for c in make_fold(cases, f, 5, x, seed=0)["training"] if c["labelled"]}
               for x in (0.1, 0.2, 0.5, 1.0)}
        assert len(lab[0.1]) == 1 and lab[0.1] <= lab[0.2] <= lab[0.5] <= lab[1.0] == names[0]
    assert make_fold(cases, 2, 5, 0.2, seed=0) == make_fold(cases, 2, 5, 0.2, seed=0)
    assert make_fold(cases, 2, 5, 0.2, seed=1)["test"] != make_fold(cases, 2, 5, 0.2, seed=0)["test"]
    with pytest.raises(ValueError, match="fold must be in"):
        make_fold(cases, 5, 5)


def test_test_fraction_one_puts_everything_in_test(brats_dir):
    s = make_split(brats_cases(brats_dir), test_fraction=1.0, val_fraction=0.0)
    assert len(s["test"]) == 15 and s["training"] == [] and s["validation"] == []


def test_datalist_round_trip_uses_relative_paths(tmp_path, brats_dir):
    s = make_split(brats_cases(brats_dir), 0.2, seed=0)
    out = write_datalist(s, tmp_path / "dl.json", brats_dir)
    raw = json.loads(out.read_text())
    assert not raw["training"][0]["image"][0].startswith("/")
    assert raw["training"][0]["image"][0].endswith("_flair.nii.gz")
    assert load_datalist(out, brats_dir) == s


def test_cli_split_writes_msd_datalist(tmp_path, brats_dir):
    out = tmp_path / "split.json"
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "data", "split", str(brats_dir), "--out", str(out),
                        "--label_fraction", "0.2", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert set(d) >= {"training", "validation", "test"}
    assert sum(c["labelled"] for c in d["training"]) == 2


# --- bad input: one clear message naming the file and the expectation ---------------------------

def _problems(root):
    problems = check_dataset_dir(root)
    assert problems, "the damage was not detected"
    return "\n".join(problems)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_damaged_case_is_reported_with_file_and_expectation(brats_copy, damage):
    root = brats_copy(2)
    bad, expectation = damage(root)
    msg = _problems(root)
    assert f"{bad}: " in msg and expectation in msg


def test_empty_directory(tmp_path):
    msg = _problems(tmp_path)
    assert str(tmp_path) in msg and "no cases found" in msg


def test_every_problem_in_one_pass(brats_copy):
    root = brats_copy(3)
    case_file(root, "t1ce", 0).unlink()
    f = case_file(root, "flair", 2)
    f.write_bytes(f.read_bytes()[:100])
    assert len(check_dataset_dir(root)) == 2


def test_cli_check_exit_code_and_report(brats_copy):
    root = brats_copy(2)
    case_file(root, "t1ce").unlink()
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "data", "check", str(root)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "t1ce.nii.gz: missing" in r.stderr


def test_datalist_naming_a_missing_file(tmp_path, brats_dir):
    s = make_split(brats_cases(brats_dir), 1.0, seed=0)
    s["training"][0]["image"][2] = str(brats_dir / "nope" / "nope_t1ce.nii.gz")
    dl = write_datalist(s, tmp_path / "dl.json", brats_dir)
    with pytest.raises(DataError, match="nope_t1ce.nii.gz: missing"):
        bundle_datalist(str(brats_dir), str(dl))


def test_bundle_datalist_missing_dir(tmp_path):
    with pytest.raises(DataError, match="expected the data set folder"):
        bundle_datalist(str(tmp_path / "absent"))


def test_download_without_internet_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "SOURCE_URL", "http://127.0.0.1:9/")  # nothing listens on the discard port
    with pytest.raises(DownloadError, match="no internet access"):
        sample.download(tmp_path, timeout=2)


def test_download_refuses_a_checksum_mismatch(tmp_path, monkeypatch):
    class Fake:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"not the real file"

    monkeypatch.setattr(sample.urllib.request, "urlopen", lambda url, timeout: Fake())
    with pytest.raises(DownloadError, match="does not match"):
        sample.download(tmp_path)
    assert not list(tmp_path.rglob("*.nii.gz")), "a refused file was kept"


def test_prepare_crops_and_resamples_a_1mm_case(tmp_path, brats_dir):
    """Upsample a real 2 mm case to 1 mm with a zero border, then prepare it back to 2 mm."""
    from monai.transforms import Spacing

    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    src = tmp_path / "1mm" / case.name
    src.mkdir(parents=True)
    for m in ("flair", "t1", "t1ce", "t2", "seg"):
        img = nib.load(case / f"{case.name}_{m}.nii.gz")
        arr = np.asarray(img.dataobj).astype(np.float32)[None]
        from monai.data import MetaTensor

        up = Spacing((1.0, 1.0, 1.0), mode="nearest" if m == "seg" else "bilinear")(MetaTensor(arr, affine=img.affine))
        big = np.pad(np.asarray(up[0]), 10)
        aff = np.asarray(up.affine)
        aff[:3, 3] -= aff[:3, :3] @ np.full(3, 10)
        nib.save(nib.Nifti1Image(np.rint(big).astype(np.int16), aff), src / f"{case.name}_{m}.nii.gz")
    out = tmp_path / "2mm"
    sample.prepare(tmp_path / "1mm", out)
    prepared = out / case.name
    assert check_dataset_dir(out) == []
    got = nib.load(prepared / f"{case.name}_flair.nii.gz")
    orig = nib.load(case / f"{case.name}_flair.nii.gz")
    np.testing.assert_allclose(got.header.get_zooms(), (2, 2, 2))
    assert all(abs(a - b) <= 4 for a, b in zip(got.shape, orig.shape)), (got.shape, orig.shape)
    seg = np.asarray(nib.load(prepared / f"{case.name}_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).sum() > 0.8 * (np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj) > 0).sum()


def test_a_modality_given_as_dicom_series_is_read_and_checked(brats_copy):
    from monai.transforms import LoadImage

    from conftest import nifti_to_dicom_series

    root = brats_copy(2)
    nii = case_file(root, "t1ce")
    series = nifti_to_dicom_series(nii, nii.parent / nii.name.replace(".nii.gz", ""))
    ref = LoadImage(image_only=True)(str(nii))
    nii.unlink()
    case = brats_cases(root)[0]
    assert case["image"][2] == str(series)
    assert check_dataset_dir(root) == []
    for reader in ("ITKReader", "PydicomReader"):
        img = LoadImage(image_only=True, reader=reader)(str(series))
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))
        np.testing.assert_allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3)


def test_ensure_sample_uses_a_present_copy_without_downloading(monkeypatch, brats_dir):
    def no_download(*a, **k):
        raise AssertionError("downloaded although the sample is present")

    monkeypatch.setattr(sample, "download", no_download)
    assert sample.ensure_sample(brats_dir.parent, brats_dir.name) == brats_dir
