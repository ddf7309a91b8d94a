"""End to end: every stage of the context_restoration bundle through `python -m monai.bundle run`,
on the real BraTS sample, with a tiny budget (the numbers mean nothing; the wiring does)."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import (REPO, TINY, bundle_runner, check_killed_run_resumes_exactly, check_metadata_and_export,
                      damage_label)

BUNDLE, CONFIGS, monai_run = bundle_runner("context_restoration")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cr")
    pre, ft, ev = root / "pretrain", root / "train", root / "eval"
    monai_run("pretrain", *TINY, "--ckpt_dir", pre)
    monai_run("train", "--max_epochs", 2, "--epoch_length", 2, "--val_interval", 1, "--ckpt_dir", ft,
              "--pretrained_ckpt", pre / "pretrained.pt", "--label_fraction", 0.2)
    monai_run("evaluate", "--ckpt_dir", ft, "--output_dir", ev)
    return {"root": root, "pretrain": pre, "train": ft, "eval": ev}


def test_pretrain_writes_checkpoints(runs):
    assert (runs["pretrain"] / "pretrained.pt").is_file()
    state = torch.load(runs["pretrain"] / "pretrain_checkpoint.pt", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2  # 1 epoch x 2 iterations
    assert not list(runs["pretrain"].glob(".*.tmp")), "a temp file was left behind"


def test_pretrain_measures_its_pretext_against_the_identity_on_held_out_crops(runs):
    """Two steps from the zero-initialised gate: the restoration is still (nearly) the identity, so the
    held-out restoration MSE equals the identity's to within a few percent and the check says 'not learned'."""
    health = json.loads((runs["pretrain"] / "pretext_health.json").read_text())
    assert health["metric"] == "restoration_mse" and health["trivial_rule"] == "identity"
    assert health["crops"] == 16 and health["cases"] >= 1
    assert 0.02 < health["corrupted_fraction"] < 0.2  # 20 swaps of 2 x 8^3 voxels in a 64^3 crop, in the brain
    assert health["corrupted_trivial"] > health["trivial"] > 0  # the identity errs only on swapped voxels
    assert abs(health["value"] / health["trivial"] - 1) < 0.05 and not health["learned"]


def test_fine_tune_starts_from_the_pretrained_weights(runs):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"pretrained_ckpt": str(runs["pretrain"] / "pretrained.pt"), "device": "$torch.device('cpu')",
                   "bundle_root": str(BUNDLE)})
    net = parser.get_parsed_content("init_network")
    pre = torch.load(runs["pretrain"] / "pretrained.pt")
    own = net.state_dict()
    shared = [k for k in own if own[k].shape == pre[k].shape]
    assert len(shared) == len(own) - 2 and all(torch.equal(own[k], pre[k]) for k in shared)
    parser.update({"init": "baseline"})
    base = parser.get_parsed_content("init_network", lazy=False)
    assert not torch.equal(base.state_dict()[shared[0]], pre[shared[0]])


def test_train_saves_best_model_and_resumes(runs):
    ft = runs["train"]
    assert (ft / "model.pt").is_file()
    assert torch.load(ft / "train_checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 4
    r = monai_run("train", "--max_epochs", 3, "--epoch_length", 2, "--val_interval", 1, "--ckpt_dir", ft,
                  "--pretrained_ckpt", runs["pretrain"] / "pretrained.pt", "--label_fraction", 0.2)
    out = r.stdout + r.stderr
    assert "resumed from" in out
    assert "Epoch[3] Complete" in out and "Epoch[1] Complete" not in out
    assert torch.load(ft / "train_checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 6


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    """SIGKILLed mid-run and run again, training ends with the same weights, losses and validation Dice to
    the last bit as a run that was never interrupted (each epoch's randomness depends only on seed and
    epoch; the cut-off epoch is redone from its start)."""
    check_killed_run_resumes_exactly(CONFIGS, "train", ["--max_epochs", 2, "--epoch_length", 3, "--val_interval", 2,
                                                        "--init", "baseline", "--label_fraction", 0.2],
                                     tmp_path, "train_checkpoint.pt")


def test_training_records_its_settings_and_evaluate_takes_them_from_the_run_folder(tmp_path):
    """A training run's folder holds run.json with every setting it ran with; `medssl run ... evaluate
    --ckpt_dir RUN` applies those the model needs (here a narrower network), where evaluating with the
    defaults fails naming the settings to give."""
    run = tmp_path / "narrow"
    monai_run("train", *TINY, "--val_interval", 1, "--init", "baseline", "--label_fraction", 0.2,
              "--network_def#channels", "[8, 16, 32, 64, 128]", "--ckpt_dir", run)
    record = json.loads((run / "run.json").read_text())
    assert record["bundle"] == "context_restoration" and record["stage"] == "train"
    assert record["overrides"]["network_def#channels"] == [8, 16, 32, 64, 128]
    assert record["settings"]["learning_rate"] == 0.001 and record["settings"]["label_fraction"] == 0.2
    assert record["settings"]["seed"] == 0 and record["run_settings"]["init"] == "baseline"
    from monai.networks.nets import UNet

    from medssl.networks import CheckpointMismatchError, load_pretrained

    default = UNet(3, 4, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))  # what evaluate builds by default
    with pytest.raises(CheckpointMismatchError, match=r"says it was trained with .*--network_def#channels \[8, 16, 32, 64, 128\]"):
        load_pretrained(default, run / "model.pt", allow_head_mismatch=False)
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "run", "context_restoration", "evaluate", "--ckpt_dir",
                        str(run), "--output_dir", str(tmp_path / "e2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as trained" in r.stderr and "--network_def#channels [8, 16, 32, 64, 128]" in r.stderr
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["num_cases"] == 4


def test_resume_with_other_settings_is_refused_naming_them(runs, tmp_path):
    """Re-running into a checkpoint folder with other settings trains nothing and says which differ;
    ``--resume false`` trains afresh over it."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(runs["train"], ft)
    before = torch.load(ft / "train_checkpoint.pt", weights_only=False)
    r = monai_run("train", "--max_epochs", 9, "--epoch_length", 2, "--val_interval", 1, "--ckpt_dir", ft,
                  "--init", "baseline", "--label_fraction", 0.1, "--seed", 1, check=False)
    assert r.returncode != 0
    err = r.stderr
    assert f"{ft / 'train_checkpoint.pt'}: holds a run with other settings" in err
    for said in ("init: 'method' there, 'baseline' now", "label_fraction: 0.2 there, 0.1 now", "seed: 0 there, 1 now",
                 "datalist: "):
        assert said in err, said
    assert "Epoch[1] Complete" not in r.stdout + err
    after = torch.load(ft / "train_checkpoint.pt", weights_only=False)
    assert after["trainer"] == before["trainer"] and after["settings"] == before["settings"]
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "run", "context_restoration", "train", "--ckpt_dir", str(ft),
                        "--init", "baseline", "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "medssl run context_restoration train: SettingsMismatchError")
    monai_run("train", "--max_epochs", 1, "--epoch_length", 2, "--val_interval", 1, "--ckpt_dir", ft,
              "--init", "baseline", "--label_fraction", 0.1, "--seed", 1, "--resume", False)
    fresh = torch.load(ft / "train_checkpoint.pt", weights_only=False)
    assert fresh["trainer"]["iteration"] == 2 and fresh["settings"]["init"] == "baseline"


def test_evaluate_writes_dice_and_hd95_per_region(runs):
    m = json.loads((runs["eval"] / "metrics.json").read_text())
    assert m["num_cases"] == 4 and len(m["per_case"]) == 4
    assert set(m["dice"]) == {"TC", "WT", "ET"} and set(m["hd95"]) == {"TC", "WT", "ET"}
    assert 0.0 <= m["mean_dice"] <= 1.0
    assert m["mean_dice"] == pytest.approx(np.mean([v for v in m["dice"].values()]), abs=1e-5)


def test_inference_writes_label_maps_with_the_input_affine(runs, brats_copy):
    src = brats_copy(2)
    out = runs["root"] / "pred"
    monai_run("inference", "--ckpt_dir", runs["train"], "--dataset_dir", src, "--output_dir", out)
    for case in sorted(p for p in src.iterdir() if p.is_dir()):
        pred = nib.load(out / f"{case.name}_seg.nii.gz")
        ref = nib.load(case / f"{case.name}_flair.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}


def test_medssl_run_wraps_the_bundle_runner(runs):
    out = runs["root"] / "eval2"
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "run", "context_restoration", "evaluate",
                        "--ckpt_dir", str(runs["train"]), "--output_dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text()) == json.loads((runs["eval"] / "metrics.json").read_text())


def test_fine_tune_from_a_checkpoint_of_another_network_stops_before_training(runs, tmp_path):
    from monai.networks.nets import UNet

    other = tmp_path / "other.pt"
    torch.save(UNet(2, 1, 2, (8, 16), (2,)).state_dict(), other)
    r = monai_run("train", *TINY, "--ckpt_dir", tmp_path / "ft", "--pretrained_ckpt", other, check=False)
    assert r.returncode != 0
    assert f"{other}: checkpoint of another network" in r.stderr
    assert not (tmp_path / "ft").exists(), "training started"
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "run", "context_restoration", "train",
                        "--ckpt_dir", str(tmp_path / "ft"), "--pretrained_ckpt", str(other)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("medssl run context_restoration train: CheckpointMismatchError")


def test_bad_data_stops_before_training(brats_copy, tmp_path):
    root = brats_copy(6)
    bad, expectation = damage_label(root)
    r = monai_run("train", *TINY, "--init", "baseline", "--dataset_dir", root, "--ckpt_dir", tmp_path / "ft",
                  check=False)
    assert r.returncode != 0
    assert f"{bad}: {expectation}" in r.stderr
    assert not (tmp_path / "ft").exists()


def test_verify_metadata_net_in_out_and_torchscript_export(runs, tmp_path):
    from monai.networks.nets import UNet

    ref = UNet(3, 4, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=0)
    check_metadata_and_export(BUNDLE, runs["train"] / "model.pt", ref, torch.randn(1, 4, 64, 64, 64), tmp_path)


TEARDOWN_ABORT = "terminate called without an active exception"


def test_multi_gpu_config_trains_with_torchrun_on_cpu(runs, tmp_path):
    """Two gloo processes on CPU: DDP over the network, DistributedSampler, rank-0 handlers only."""

    def torchrun(ckpt_dir):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "monai.bundle", "run", "--config_file",
               f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
               "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1", "--ckpt_dir", str(ckpt_dir),
               "--pretrained_ckpt", str(runs["pretrain"] / "pretrained.pt"), "--label_fraction", "0.2"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)

    ckpt = tmp_path / "ddp"
    r = torchrun(ckpt)
    both_ranks_finished = r.stdout.count("SupervisedTrainer - INFO - Engine run finished") == 2
    if r.returncode != 0 and TEARDOWN_ABORT in r.stderr and both_ranks_finished and (ckpt / "model.pt").is_file():
        # torch 2.13 + gloo: now and then a rank aborts while its interpreter exits, after both ranks finished
        # training and rank 0 saved the model (2 of 185 runs here). One retry, from scratch, must pass.
        ckpt = tmp_path / "ddp_retry"
        r = torchrun(ckpt)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (ckpt / "model.pt").is_file()
    state = torch.load(ckpt / "model.pt")
    assert not any(k.startswith("module.") for k in state), "model.pt must hold the bare network"
