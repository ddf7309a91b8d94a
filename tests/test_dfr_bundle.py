"""dfr_barlow end to end on real DSB 2018 nuclei, tiny budget, on a 30-image datalist."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data import DataError, bundle_datalist, make_split, nuclei_cases, write_datalist
from medssl.networks import DFRUNet

from conftest import TINY, bundle_runner, check_metadata_and_export

BUNDLE, CONFIGS, monai_run = bundle_runner("dfr_barlow")
TINY = [*TINY, "--batch_size", "4"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, nuclei_dir):
    root = tmp_path_factory.mktemp("dfr")
    split = make_split(nuclei_cases(nuclei_dir)[:30], label_fraction=0.2, seed=0)
    dl = write_datalist(split, root / "datalist.json", nuclei_dir)
    common = ["--dataset_dir", nuclei_dir, "--datalist_file", dl]
    monai_run("pretrain", *TINY, *common, "--ckpt_dir", root / "pretrain")
    monai_run("train", *TINY, *common, "--val_interval", 1, "--ckpt_dir", root / "train",
              "--pretrained_ckpt", root / "pretrain" / "pretrained.pt")
    monai_run("evaluate", *common, "--ckpt_dir", root / "train", "--output_dir", root / "eval")
    return {"root": root, "datalist": dl, "split": split, "common": common}


def test_pretraining_transfers_into_the_segmentation_network(runs):
    pre = torch.load(runs["root"] / "pretrain" / "pretrained.pt")
    fresh = DFRUNet(2, 1, 2).state_dict()
    assert set(pre) == set(fresh), "pretrained.pt must hold the DFRUNet backbone, not the projector"
    enc = [k for k in pre if k.startswith("encoders.0.")]
    assert enc and not all(torch.equal(pre[k], fresh[k]) for k in enc)
    state = torch.load(runs["root"] / "pretrain" / "pretrain_checkpoint.pt", weights_only=False)
    assert any(k.startswith("head.") for k in state["projector"])


def test_curves_log_the_pretext_terms_and_the_fine_tuning_loss_terms(runs):
    pre = json.loads((runs["root"] / "pretrain" / "pretrain_curve.json").read_text())
    assert [i for i, _ in pre["loss"]] == [1, 2]
    for term in ("train_on_diagonal", "train_off_diagonal"):
        assert len(pre["metrics"][term]) == 2 and all(v is not None and v >= 0 for _, v in pre["metrics"][term])
    ft = json.loads((runs["root"] / "train" / "train_curve.json").read_text())
    assert {"val_mean_dice", "train_seg_loss", "train_embedding_loss"} <= set(ft["metrics"])
    for (i, loss), (_, seg), (_, emb) in zip(ft["loss"], ft["metrics"]["train_seg_loss"], ft["metrics"]["train_embedding_loss"]):
        assert loss == pytest.approx(seg + 0.1 * emb, abs=1e-4)


def test_evaluate_reports_the_papers_metrics(runs):
    m = json.loads((runs["root"] / "eval" / "metrics.json").read_text())
    assert m["num_cases"] == len(runs["split"]["test"])
    for key in ("dice", "iou", "hd95"):
        assert set(m[key]) == {"nucleus"}
    assert set(m["miou"]) == {"background", "nucleus"}
    assert 0 <= m["precision"] <= 1 and 0 <= m["mean_dice"] <= 1
    assert m["mean_miou"] == pytest.approx((m["miou"]["background"] + m["miou"]["nucleus"]) / 2, abs=1e-5)


def test_inference_writes_png_masks_for_rgba_rgb_and_grey_inputs(runs, nuclei_dir, tmp_path):
    src = sorted((nuclei_dir / "images").glob("*.png"))[0]
    (tmp_path / "in" / "images").mkdir(parents=True)
    for mode in ("RGBA", "RGB", "L"):
        Image.open(src).convert(mode).save(tmp_path / "in" / "images" / f"{mode}.png")
    monai_run("inference", "--ckpt_dir", runs["root"] / "train", "--dataset_dir", tmp_path / "in",
              "--output_dir", tmp_path / "out")
    masks = {m: np.asarray(Image.open(tmp_path / "out" / f"{m}_seg.png")) for m in ("RGBA", "RGB", "L")}
    for m in masks.values():
        assert m.shape == Image.open(src).size[::-1] and set(np.unique(m)) <= {0, 255}
    assert np.array_equal(masks["RGBA"], masks["RGB"])


def test_export_and_metadata(runs, tmp_path):
    check_metadata_and_export(BUNDLE, runs["root"] / "train" / "model.pt", DFRUNet(2, 1, 2), torch.rand(1, 1, 64, 64),
                              tmp_path)


def test_barlow_twins_with_batch_size_one_stops_before_training(runs, tmp_path):
    r = monai_run("pretrain", "--batch_size", 1, *runs["common"], "--ckpt_dir", tmp_path / "pre", check=False)
    assert r.returncode != 0 and "Barlow Twins needs a batch size of at least 2" in r.stderr
    assert not (tmp_path / "pre").exists()


def test_label_of_another_size_is_refused(nuclei_copy):
    root = nuclei_copy()
    lab = sorted((root / "labels").glob("*.png"))[1]
    im = Image.open(lab)
    im.resize((im.size[0] // 2, im.size[1])).save(lab)
    with pytest.raises(DataError) as e:
        bundle_datalist(str(root), val_fraction=0, test_fraction=0)
    assert f"{lab}: size" in str(e.value) and "expected the same height and width" in str(e.value)


def test_label_with_several_channels_is_refused(nuclei_copy):
    root = nuclei_copy()
    lab = sorted((root / "labels").glob("*.png"))[0]
    arr = (np.asarray(Image.open(lab)) > 0).astype(np.uint8) * 255
    Image.fromarray(np.stack([arr] * 3, -1)).save(lab)
    with pytest.raises(DataError) as e:
        bundle_datalist(str(root), val_fraction=0, test_fraction=0)
    assert f"{lab}: expected a single-channel label map" in str(e.value)


def test_brats_axial_slices_through_the_same_bundle(tmp_path, brats_copy):
    """dataset_name=brats18_2mm: 4 modalities as channels, 2D axial slices for training (WT), the 2D network
    applied slice by slice (SliceInferer) to whole volumes for evaluation and NIfTI inference."""
    import nibabel as nib

    from medssl.data import brats_cases

    data = brats_copy(6)
    dl = write_datalist(make_split(brats_cases(data), 0.5, seed=0), tmp_path / "dl.json", data)
    common = ["--dataset_name", "brats18_2mm", "--dataset_dir", data, "--datalist_file", dl]
    monai_run("pretrain", *TINY, *common, "--ckpt_dir", tmp_path / "pre")
    # every pretraining step ran: 8 slices per volume fill the batches of 4 (the tiny budget's) ...
    assert torch.load(tmp_path / "pre" / "pretrain_checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 2
    # ... and a batch larger than the data set is refused instead of "training" on empty epochs
    r = monai_run("pretrain", *TINY, *common, "--batch_size", 64, "--ckpt_dir", tmp_path / "pre64", check=False)
    assert r.returncode != 0 and "fewer than one batch of 8 with drop_last: nothing would train" in r.stderr
    monai_run("train", *TINY, *common, "--val_interval", 1, "--ckpt_dir", tmp_path / "ft",
              "--pretrained_ckpt", tmp_path / "pre" / "pretrained.pt")
    assert torch.load(tmp_path / "ft" / "model.pt")["encoders.0.0.conv.weight"].shape[1] == 4
    monai_run("evaluate", *common, "--ckpt_dir", tmp_path / "ft", "--output_dir", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["dice"]) == {"WT"} and m["hd95_unit"] == "voxels" and m["num_cases"] == 2
    monai_run("inference", "--dataset_name", "brats18_2mm", "--dataset_dir", data, "--ckpt_dir", tmp_path / "ft",
              "--output_dir", tmp_path / "pred")
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    pred, ref = nib.load(tmp_path / "pred" / f"{case.name}_seg.nii.gz"), nib.load(case / f"{case.name}_flair.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)


def test_train_on_brats_slices_takes_a_slice_level_datalist(tmp_path, brats_copy):
    """A datalist with labelled slices spread over the training volumes (``label_unit`` ``"slice"``, as the
    BraTS-slices benchmark writes it) trains; only those slices reach the training crops (SelectSlicesd)."""
    from medssl.data import brats_cases, label_slices

    data = brats_copy(4)
    split = label_slices(make_split(brats_cases(data), 0.5, seed=0), 0.1)
    assert all(c.get("labelled_slices") for c in split["training"])  # both training volumes, a few slices each
    dl = write_datalist(split, tmp_path / "dl.json", data)
    monai_run("train", *TINY, "--dataset_name", "brats18_2mm", "--dataset_dir", data, "--datalist_file", dl,
              "--init", "baseline", "--val_interval", 1, "--ckpt_dir", tmp_path / "ft")
    assert (tmp_path / "ft" / "model.pt").is_file()


def test_every_variant_runs_on_brats_slices_through_the_harness(tmp_path, brats_copy):
    """The BraTS-slices benchmark (``--data_dir`` a BraTS folder: the spec's ``brats`` layout) runs every
    variant and pretraining of the spec, per volume (WT), with the snapshot training length chosen on
    validation; the Barlow Twins pretext curves hold the on- and off-diagonal terms."""
    from medssl.apps.benchmark import load_spec, run_benchmark

    spec = load_spec("dfr_barlow")
    data = brats_copy(4)
    res = run_benchmark("dfr_barlow", str(data), fractions="1.0", folds=2, seed=0, budget="smoke",
                        out=str(tmp_path / "bench"), progress=False, logging_file=False)
    assert res["regions"] == ["WT"] and {r["variant"] for r in res["runs"]} == set(spec.names)
    for name in spec.names:
        tested = sorted(c for r in res["runs"] if r["variant"] == name for c in r["cases"])
        assert tested == sorted(p.name for p in data.iterdir()), name
    assert {s["variant"] for s in res["selected_steps"]} == set(spec.names)
    assert set(res["pretrain_curves"]) == set(spec.pretrainings)
    for curves in res["pretrain_curves"].values():
        for c in curves.values():
            assert c["train_on_diagonal_curve"] and c["train_off_diagonal_curve"]
    assert (tmp_path / "bench" / "pretext_curves.png").is_file()
    # each run of the no-attention / plain variants trained the network its overrides name
    pre = torch.load(tmp_path / "bench" / "fold0" / "pretrain_plain_unet" / "pretrained.pt")
    assert pre and not any(k.startswith(("bottleneck.branches", "bottleneck.fuse")) for k in pre)
    state = torch.load(tmp_path / "bench" / "fold0" / "f1" / "plain_unet" / "model.pt")
    assert set(state) == set(pre)
