"""slem end to end on the real BraTS sample through `python -m monai.bundle run`, tiny budget (the numbers
mean nothing; the wiring does), and its bad-input errors before training."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.bundle import ConfigParser

from medssl.contract import stage_files
from medssl.networks import BlockMixHead, CFBUNet, GatedRestoration
from medssl.transforms import RandContextSwapd, RandModalityBlockMixd

from conftest import TINY, bundle_runner, check_metadata_and_export, damage_missing_t1ce

BUNDLE, _, monai_run = bundle_runner("slem")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slem")
    monai_run("pretrain", *TINY, "--ckpt_dir", root / "pretrain")
    monai_run("pretrain", *TINY, "--ckpt_dir", root / "pretrain_cr", "--pretext", "context_restoration")
    monai_run("train", *TINY, "--val_interval", 1, "--ckpt_dir", root / "train",
              "--pretrained_ckpt", root / "pretrain" / "pretrained.pt", "--label_fraction", 0.2)
    monai_run("evaluate", "--ckpt_dir", root / "train", "--output_dir", root / "eval")
    return root


def _parser(stage, **overrides):
    """The stage's config files layered as the model zoo runs them (pretrain and evaluate over train.json)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in stage_files(stage)])
    parser.update({"device": "$torch.device('cpu')", "bundle_root": str(BUNDLE), **overrides})
    return parser


def test_pretext_pretraining_saves_the_segmentation_network_with_its_cfb(runs):
    state = torch.load(runs / "pretrain" / "pretrain_checkpoint.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 2
    assert any(k.startswith("head.") for k in state["pretext_network"])  # the combination classifier
    pre = torch.load(runs / "pretrain" / "pretrained.pt")
    seg = CFBUNet(3, 4, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=0)
    assert set(pre) == set(seg.state_dict())
    assert any("branches" in k for k in pre) and any("pool" in k for k in pre)  # the CFB is pretrained too
    # the context-restoration pretext pretrains the same network (only the output head differs)
    cr = torch.load(runs / "pretrain_cr" / "pretrained.pt")
    assert set(cr) == set(pre)
    assert [k for k in pre if pre[k].shape != cr[k].shape] == ["model.2.conv.weight", "model.2.conv.bias"]


def test_pretext_accuracy_and_fine_tuning_curves_are_logged(runs):
    """The block-mix pretraining logs its classification accuracy per step (the harness's pretext curves);
    context restoration logs its loss only; fine-tuning writes its loss and validation curve."""
    curve = json.loads((runs / "pretrain" / "pretrain_curve.json").read_text())
    acc = curve["metrics"]["train_accuracy"]
    assert [i for i, _ in acc] == [1, 2] and all(0.0 <= v <= 1.0 for _, v in acc)
    assert len(curve["loss"]) == 2
    cr = json.loads((runs / "pretrain_cr" / "pretrain_curve.json").read_text())
    assert len(cr["loss"]) == 2 and "train_accuracy" not in cr["metrics"]
    train = json.loads((runs / "train" / "train_curve.json").read_text())
    assert len(train["loss"]) == 2 and len(train["metrics"]["val_mean_dice"]) == 1


def test_fine_tune_starts_from_the_pretrained_encoder_and_cfb(runs):
    parser = _parser("train", pretrained_ckpt=str(runs / "pretrain" / "pretrained.pt"))
    own = parser.get_parsed_content("init_network").state_dict()
    pre = torch.load(runs / "pretrain" / "pretrained.pt")
    assert all(torch.equal(own[k], pre[k]) for k in own if own[k].shape == pre[k].shape)
    parser.update({"init": "baseline", "context_fusion": False})
    plain = parser.get_parsed_content("init_network", lazy=False)
    assert not any("branches" in k for k in plain.state_dict())  # the from-scratch plain U-Net baseline


def test_evaluate_reports_the_three_regions_and_inference_writes_label_maps(runs, brats_copy):
    m = json.loads((runs / "eval" / "metrics.json").read_text())
    assert set(m["dice"]) == {"TC", "WT", "ET"} and set(m["hd95"]) == {"TC", "WT", "ET"}
    src = brats_copy(1)
    monai_run("inference", "--ckpt_dir", runs / "train", "--dataset_dir", src, "--output_dir", runs / "pred")
    case = next(p for p in src.iterdir() if p.is_dir())
    pred = nib.load(runs / "pred" / f"{case.name}_seg.nii.gz")
    ref = nib.load(case / f"{case.name}_t2.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}


def test_export_and_metadata(runs, tmp_path):
    ref = CFBUNet(3, 4, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=0)
    check_metadata_and_export(BUNDLE, runs / "train" / "model.pt", ref, torch.randn(1, 4, 64, 64, 64), tmp_path)


@pytest.mark.parametrize("pretext,network,loss,out_channels,transform", [
    ("block_mix", BlockMixHead, torch.nn.CrossEntropyLoss, 3, RandModalityBlockMixd),
    ("context_restoration", GatedRestoration, torch.nn.MSELoss, 8, RandContextSwapd),
])
def test_the_pretext_switch_picks_network_loss_head_and_transforms_together(pretext, network, loss, out_channels,
                                                                            transform):
    """``pretext`` (one ``medssl.utils.choose`` per part in pretrain.json) selects every pretext-specific part
    at once, over the shared CFB U-Net that fine-tuning loads."""
    parser = _parser("pretrain", pretext=pretext)
    net = parser.get_parsed_content("network")
    assert type(net) is network and isinstance(parser.get_parsed_content("loss"), loss)
    assert parser.get_parsed_content("network_def").out_channels == out_channels
    assert net.backbone is parser.get_parsed_content("network_def")  # pretrained.pt is the backbone
    random = parser.get_parsed_content("train#random_transforms")
    assert isinstance(random[-1], transform)
    assert not any(isinstance(t, (RandContextSwapd, RandModalityBlockMixd)) and not isinstance(t, transform)
                   for t in random)


def _error_text(e):
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("overrides,message", [
    ({"blocks": [2, 3, 1]}, "block grid (2, 3, 1) does not divide the crop (64, 64, 64)"),
    ({"blocks": [2, 1, 1], "num_combinations": 600},
     "num_combinations=600 exceeds the 576 possible combinations"),
    ({"pretext": "jigsaw"}, "pretext must be one of ['block_mix', 'context_restoration'], got 'jigsaw'"),
])
def test_bad_pretext_settings_fail_while_the_config_is_parsed(overrides, message):
    with pytest.raises(Exception) as e:
        _parser("pretrain", **overrides).get_parsed_content("train#trainer")
    assert message in _error_text(e.value)


def test_a_case_with_three_of_four_modalities_stops_before_training(brats_copy, tmp_path):
    root = brats_copy(6)
    bad, expectation = damage_missing_t1ce(root)
    for stage in ("pretrain", "train"):
        r = monai_run(stage, *TINY, "--init", "baseline", "--dataset_dir", root, "--ckpt_dir", tmp_path / stage,
                      check=False)
        assert r.returncode != 0 and f"{bad}: {expectation}" in r.stderr
        assert not (tmp_path / stage).exists(), "training started"


def test_every_benchmark_variant_differs_from_baseline_in_exactly_one_factor():
    """The harness compares each variant with ``baseline`` case by case: each such pair must isolate one
    factor (the pretext, the CFB), and method vs context_restoration only the pretext."""
    from medssl.apps.benchmark import load_spec

    spec = load_spec("slem")
    defaults = _parser("train").get_parsed_content("init"), _parser("train").get_parsed_content("context_fusion")

    def factors(name):
        v = spec.variants[name]
        train = {"init": defaults[0], "context_fusion": defaults[1], **v.train}
        weights = v.pretrain if train.pop("init") == "method" else None
        assert (weights is None) == (v.pretrain is None), f"{name}: init=method needs a pretraining and only then"
        return {"weights": weights, **train}

    base = factors("baseline")
    assert base == {"weights": None, "context_fusion": True}  # the CFB net from scratch
    differ = {name: sorted(k for k in base.keys() | factors(name).keys() if base.get(k) != factors(name).get(k))
              for name in spec.names if name != "baseline"}
    assert differ == {"method": ["weights"], "no_cfb": ["context_fusion"], "context_restoration": ["weights"]}
    assert factors("method")["weights"] == "block_mix" and factors("context_restoration")["weights"] == "context_restoration"
    assert spec.pretrainings == {"block_mix": {}, "context_restoration": {"pretext": "context_restoration"}}
    for budget in spec.budgets.values():  # both pretexts get the same pretraining budget
        assert set(budget["pretrain"]) <= {"max_epochs", "epoch_length"}
