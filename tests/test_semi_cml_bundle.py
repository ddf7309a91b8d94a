"""semi_cml end to end on the real BraTS sample through `python -m monai.bundle run`, tiny budget and
small networks (the numbers mean nothing; the wiring does), and its data rules."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.networks.nets import UNet

from conftest import TINY, bundle_runner, case_file, check_killed_run_resumes_exactly, check_metadata_and_export, damage_shape

BUNDLE, CONFIGS, monai_run = bundle_runner("semi_cml")
SMALL = ["--channels", "[8,16,32,64,128]"]
TRAIN = [*TINY, "--val_interval", "1", *SMALL]
CML = ["--max_epochs", "2", "--epoch_length", "2", "--val_interval", "1", *SMALL]  # 2 epochs: a run to cut midway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi_cml")
    monai_run("train", *CML, "--ckpt_dir", root / "cml")
    monai_run("prel", *TRAIN, "--cml_ckpt", root / "cml" / "model.pt", "--ckpt_dir", root / "prel")
    monai_run("evaluate", *SMALL, "--ckpt_dir", root / "prel", "--output_dir", root / "eval")
    return root


def test_train_saves_the_pair_and_each_modality_network(runs):
    pair = torch.load(runs / "cml" / "model.pt")
    for m in ("flair", "t2"):
        own = torch.load(runs / "cml" / f"model_{m}.pt")
        assert own.keys() == {k[len(f"networks.{m}."):] for k in pair if k.startswith(f"networks.{m}.")}
        assert all(torch.equal(v, pair[f"networks.{m}.{k}"]) for k, v in own.items())
    state = torch.load(runs / "cml" / "train_checkpoint.pt", weights_only=False)
    assert {"optimizer_flair", "optimizer_t2", "lr_scheduler_flair", "lr_scheduler_t2"} <= set(state)
    assert state["trainer"]["iteration"] == 4


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(runs, tmp_path):
    """Two data streams (labelled, unlabelled) and the contrastive memory bank: a run SIGKILLed mid-way and
    run again ends with the same two networks, losses and validation curve as one never interrupted (the
    module's cml run, trained with the same settings)."""
    check_killed_run_resumes_exactly(CONFIGS, "train", CML, tmp_path, "train_checkpoint.pt", whole=runs / "cml")


def test_prel_chooses_the_teacher_by_validation_dice_and_keeps_it_frozen(runs):
    choice = json.loads((runs / "prel" / "prel_choice.json").read_text())
    dice = choice["validation_dice"]
    assert choice["teacher"] == max(dice, key=dice.get) and {choice["teacher"], choice["student"]} == {"flair", "t2"}
    t, s = choice["teacher"], choice["student"]
    before, after = torch.load(runs / "cml" / f"model_{t}.pt"), torch.load(runs / "prel" / f"model_{t}.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    cml_s, prel_s = torch.load(runs / "cml" / f"model_{s}.pt"), torch.load(runs / "prel" / f"model_{s}.pt")
    assert any(not torch.equal(cml_s[k], prel_s[k]) for k in cml_s), "the student did not re-learn"


def test_evaluate_reports_each_modality(runs):
    m = json.loads((runs / "eval" / "metrics.json").read_text())
    assert set(m["dice"]) == {"flair", "t2"} and set(m["hd95"]) == {"flair", "t2"} and m["region"] == "WT"
    assert m["num_cases"] == 4


def test_inference_needs_only_the_chosen_modality(runs, brats_copy):
    src = brats_copy(1)
    case = next(p for p in src.iterdir() if p.is_dir())
    for modality in ("flair", "t1", "t1ce", "seg"):
        case_file(src, modality).unlink()
    out = runs / "pred"
    monai_run("inference", *SMALL, "--ckpt_dir", runs / "prel", "--dataset_dir", src, "--output_dir", out,
              "--modality", "t2")
    pred = nib.load(out / f"{case.name}_wt.nii.gz")
    ref = nib.load(case / f"{case.name}_t2.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    r = monai_run("inference", *SMALL, "--ckpt_dir", runs / "prel", "--dataset_dir", src, "--output_dir", out,
                  "--modality", "flair", check=False)
    assert r.returncode != 0 and f"{case.name}_flair.nii.gz: missing" in r.stderr
    r = monai_run("inference", *SMALL, "--ckpt_dir", runs / "prel", "--dataset_dir", src, "--modality", "t1",
                  check=False)
    assert r.returncode != 0 and "modality must be one of ['flair', 't2'], got 't1'" in r.stderr


@pytest.mark.parametrize("method", ["mean_teacher", "supervised"])
def test_reference_methods_train_on_the_same_engine(method, tmp_path):
    monai_run("train", *TRAIN, "--method", method, "--ckpt_dir", tmp_path)
    assert (tmp_path / "model_flair.pt").is_file() and (tmp_path / "model_t2.pt").is_file()
    state = torch.load(tmp_path / "train_checkpoint.pt", weights_only=False)
    assert ("teachers" in state) == (method == "mean_teacher")


def test_all_labelled_data_trains_and_prel_keeps_the_networks(runs, tmp_path):
    """100% labels: contrastive mutual learning runs on the labelled cases (labels unused there); PReL
    has no unlabelled case to re-learn from and keeps the networks, with a warning."""
    monai_run("train", *TRAIN, "--label_fraction", 1.0, "--ckpt_dir", tmp_path / "cml")
    r = monai_run("prel", *TRAIN, "--label_fraction", 1.0, "--cml_ckpt", tmp_path / "cml" / "model.pt",
                  "--ckpt_dir", tmp_path / "prel")
    assert "no unlabelled training case" in r.stdout + r.stderr
    for f in ("model.pt", "model_flair.pt", "model_t2.pt"):
        assert (tmp_path / "prel" / f).read_bytes() == (tmp_path / "cml" / f).read_bytes()


def test_bad_pairs_and_settings_stop_before_training(brats_copy, tmp_path):
    root = brats_copy(6)
    bad, expectation = damage_shape(root)  # the T2 of one case on another grid than its FLAIR
    missing = case_file(root, "t2", index=1)
    missing.unlink()
    r = monai_run("train", *TRAIN, "--dataset_dir", root, "--ckpt_dir", tmp_path / "a", check=False)
    assert r.returncode != 0 and f"{bad}: " in r.stderr and expectation in r.stderr
    assert f"{missing}: missing" in r.stderr
    assert not (tmp_path / "a").exists(), "training started"
    r = monai_run("train", *TRAIN, "--method", "fixmatch", "--ckpt_dir", tmp_path / "b", check=False)
    assert r.returncode != 0 and "method must be one of ['cml', 'mean_teacher', 'supervised']" in r.stderr
    r = monai_run("train", *TRAIN, "--modalities", "['flair', 'dwi']", "--ckpt_dir", tmp_path / "c", check=False)
    assert r.returncode != 0 and "modalities must be some of" in r.stderr


def test_resume_export_and_metadata(runs, tmp_path):
    shutil.copytree(runs / "cml", tmp_path / "cml")
    r = monai_run("train", "--max_epochs", 3, "--epoch_length", 2, "--val_interval", 1, *SMALL,
                  "--ckpt_dir", tmp_path / "cml")
    assert "resumed from" in r.stdout + r.stderr
    assert torch.load(tmp_path / "cml" / "train_checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 6
    ref = UNet(3, 1, 1, (8, 16, 32, 64, 128), (2, 2, 2, 2), num_res_units=0)
    check_metadata_and_export(BUNDLE, runs / "prel" / "model_t2.pt", ref, torch.randn(1, 1, 64, 64, 64), tmp_path,
                              overrides=SMALL)
