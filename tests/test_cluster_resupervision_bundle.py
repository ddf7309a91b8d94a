"""cluster_resupervision end to end on real BraTS slices through `python -m monai.bundle run`, tiny budget
and small networks (the numbers mean nothing; the wiring does), and its bad-input errors."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.networks import CAMSegNet

from conftest import bundle_runner, check_metadata_and_export

BUNDLE, CONFIGS, monai_run = bundle_runner("cluster_resupervision")
SMALL = ["--channels", "[8,16,32,64,128]"]
TRAIN = ["--max_epochs", 2, "--epoch_length", 2, "--batch_size", 4, "--resupervision_start_epoch", 1,
         "--rampup_epochs", 0, *SMALL]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("crs")
    monai_run("train", *TRAIN, "--ckpt_dir", root)
    return root


@pytest.mark.parametrize("output", ["refined", "cam", "gradcam"])
def test_evaluate_reports_both_failure_modes_and_the_fp_rate(trained, tmp_path, output):
    monai_run("evaluate", *SMALL, "--ckpt_dir", trained, "--output_dir", tmp_path, "--output", output)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_tumour_slices"] > 0 and m["num_tumour_free_slices"] > 0 and m["output"] == output
    for key in ("mean_dice", "under_segmentation", "over_segmentation", "false_positive_rate"):
        assert m[key] is not None and m[key] >= 0
    rows = [r for r in m["per_slice"] if r["tumour"]]
    assert m["mean_dice"] == pytest.approx(np.mean([r["dice"] for r in rows]), abs=1e-5)
    assert m["under_segmentation"] == pytest.approx(np.mean([r["under"] for r in rows]), abs=1e-5)


def test_training_never_sees_pixel_labels(trained):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    data = parser.get_parsed_content("train#data")
    assert data and all("label" not in d for d in data) and {d["class"] for d in data} == {0.0, 1.0}
    parser.update({"method": "supervised"})  # only the upper bound reads pixel labels
    assert all("label" in d for d in parser.get_parsed_content("train#data", lazy=False))



@pytest.mark.parametrize("method", ["cluster_resupervision", "cam", "supervised"])
def test_method_switches_what_trains(method):
    """train.json's variant switches: the weak iteration (with re-supervision and reconstruction only for the
    method itself) and image-level slices for the weak methods, MONAI's iteration on pixel labels otherwise."""
    from monai.bundle import ConfigParser

    from medssl.bundles import resume_settings
    from medssl.losses import ClusterReSupervisionLoss

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"method": method})
    it, keys = parser.get_parsed_content("train#iteration"), parser.get_parsed_content("train_keys")
    if method == "supervised":
        assert it is None and keys == ["image", "label"] and parser.get_parsed_content("gate") is False
        return
    assert keys == ["image"] and parser.get_parsed_content("gate") is True
    full = method == "cluster_resupervision"
    assert isinstance(it.resupervision, ClusterReSupervisionLoss) == full and it.resupervision_weight == float(full)
    assert it.reconstruction_weight == float(full) and it.target_channel == 3  # T2
    if full:  # the contribution rule: masked re-classification by default, the CAM mean as the compared option
        assert it.resupervision.contribution == "masked"
        # and a run setting: a resume with the other rule is refused (medssl.bundles.resume_settings)
        assert resume_settings(BUNDLE, "train")["contribution"] == "masked"
        assert resume_settings(BUNDLE, "train", {"contribution": "cam_mean"})["contribution"] == "cam_mean"
        parser.update({"contribution": "cam_mean"})
        assert parser.get_parsed_content("train#iteration", lazy=False).resupervision.contribution == "cam_mean"

def test_inference_writes_a_mask_per_volume(trained, brats_copy, tmp_path):
    src = brats_copy(1)
    case = next(p for p in src.iterdir() if p.is_dir())
    monai_run("inference", *SMALL, "--ckpt_dir", trained, "--dataset_dir", src, "--output_dir", tmp_path)
    pred, ref = nib.load(tmp_path / f"{case.name}_wt.nii.gz"), nib.load(case / f"{case.name}_flair.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_export_and_metadata(trained, tmp_path):
    check_metadata_and_export(BUNDLE, trained / "model.pt", CAMSegNet(2, 4, (8, 16, 32, 64, 128)),
                              torch.randn(1, 4, 96, 96), tmp_path, overrides=SMALL)


@pytest.mark.parametrize("overrides,message", [
    (["--area_threshold", 100000], "no positive (tumour) image-level label"),
    (["--area_threshold", 0], "no negative (tumour-free) image-level label"),
    (["--num_clusters", 100000, "--resupervision_start_epoch", 0], "K=100000 exceeds the"),
    (["--method", "mil"], "method must be one of ['cluster_resupervision', 'cam', 'supervised']"),
    (["--cam_stride", 3], "cam_stride must be one of [1, 2, 4, 8, 16]"),
])
def test_bad_settings_fail_with_one_clear_error(overrides, message, tmp_path):
    r = monai_run("train", *TRAIN, *overrides, "--ckpt_dir", tmp_path / "x", check=False)
    assert r.returncode != 0 and message in r.stderr
