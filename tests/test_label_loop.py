"""The MONAI Label learning loop on real BraTS studies: active learning by modality disagreement
(medssl.label.disagreement / .strategy) and training on labelled and unlabelled studies (medssl.label.trainer).

The networks here are stand-ins with a known behaviour - each thresholds its own normalised modality
(FLAIR / T2 hyperintensity, where BraTS tumour and oedema are bright in both) - so which study the two
"disagree" on is known: the one whose T2 channel was mirrored (left-right and front-back: its tumour no longer
where the FLAIR's is, as if it came from another patient)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medssl.data import BRATS_MODALITIES
from medssl.label.disagreement import mask_dice, modality_dice, rank_by_disagreement


class Bright(nn.Module):
    """A stand-in modality network: logits > 0 where the (z-scored) intensity is above ``level``."""

    def __init__(self, level: float = 1.5):
        super().__init__()
        self.level = level

    def forward(self, x):
        return (x - self.level) * 10.0


def _studies(src, dst, n=3):
    """``n`` real BraTS cases as 4-channel studies (``dst/<case>.nii.gz``, the flair's affine); the last one's
    T2 is mirrored: its FLAIR and T2 disagree."""
    cases = sorted(p for p in src.iterdir() if p.is_dir())[:n]
    dst.mkdir(parents=True, exist_ok=True)
    for k, case in enumerate(cases):
        ref = nib.load(case / f"{case.name}_flair.nii.gz")
        chans = [np.asarray(nib.load(case / f"{case.name}_{m}.nii.gz").dataobj, np.float32) for m in BRATS_MODALITIES]
        if k == n - 1:
            chans[BRATS_MODALITIES.index("t2")] = np.ascontiguousarray(np.flip(chans[BRATS_MODALITIES.index("t2")], (0, 1)))
        nib.save(nib.Nifti1Image(np.stack(chans, -1), ref.affine, ref.header), dst / f"{case.name}.nii.gz")
    return [c.name for c in cases]


def _datastore(brats_dir, tmp_path, n: int, labelled: int):
    """``n`` studies (:func:`_studies`) in ``tmp_path/studies``, the first ``labelled`` with their seg as the final
    label, as a MONAI Label ``LocalDatastore``: ``(names, studies folder, datastore)``."""
    import shutil

    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    names = _studies(brats_dir, studies, n=n)
    (studies / "labels" / "final").mkdir(parents=True)
    for name in names[:labelled]:
        shutil.copy(brats_dir / name / f"{name}_seg.nii.gz", studies / "labels" / "final" / f"{name}.nii.gz")
    return names, studies, LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)


def _served_copy(bundle: str, tmp_path):
    """A bundle folder as MONAI Label serves it, without weights (configs, docs, LICENSE)."""
    import shutil

    from medssl.bundles import bundle_path

    dst = tmp_path / bundle
    for part in ("configs", "docs", "LICENSE"):
        src = bundle_path(bundle) / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / part)
    return dst


def _normalised(path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

    t = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), NormalizeIntensityd("image", nonzero=True,
                                                                                         channel_wise=True)])
    return t({"image": str(path)})["image"]


def test_mask_dice_and_ranking():
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = a.clone()
    assert mask_dice(a, b) == 1.0  # both empty: they agree
    a[:2], b[1:3] = True, True
    assert mask_dice(a, b) == pytest.approx(0.5)
    assert rank_by_disagreement({"x": 0.9, "y": 0.2, "z": 0.2}) == ["y", "z", "x"]


def test_the_study_whose_modalities_disagree_scores_lowest(brats_dir, tmp_path):
    names = _studies(brats_dir, tmp_path)
    nets, channels = {"flair": Bright(), "t2": Bright()}, {"flair": 0, "t2": 3}
    scores = {n: modality_dice(_normalised(tmp_path / f"{n}.nii.gz"), nets, channels) for n in names}
    assert rank_by_disagreement(scores)[0] == names[-1], scores
    assert all(scores[n] > scores[names[-1]] + 0.1 for n in names[:-1]), scores


def test_monai_label_strategy_serves_the_most_disagreeing_unlabelled_study(brats_dir, tmp_path, monkeypatch):
    """The MONAI Label scoring method and strategy over a real LocalDatastore: the semi_cml bundle's own
    preprocessing and sliding-window inferer (networks swapped for the stand-ins), scores stored in the
    datastore, labelled studies never served."""
    pytest.importorskip("monailabel", reason="MONAI Label is not installed (pip install -e '.[label]')")
    import shutil

    from monai.networks.nets import UNet
    from monailabel.datastore.local import LocalDatastore

    from medssl.bundles import bundle_path
    from medssl.label import disagreement, strategy

    studies = tmp_path / "studies"
    names = _studies(brats_dir, studies, n=4)
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(brats_dir / names[1] / f"{names[1]}_seg.nii.gz", studies / "labels" / "final" / f"{names[1]}.nii.gz")
    bundle = tmp_path / "semi_cml"
    shutil.copytree(bundle_path("semi_cml") / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    for m in ("flair", "t2"):  # weights the pair loads (then replaced by the stand-ins)
        torch.save(UNet(3, 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)).state_dict(),
                   bundle / "models" / f"model_{m}.pt")

    class StandIns(disagreement.SemiCMLPair):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.nets = {m: Bright() for m in self.nets}

    monkeypatch.setattr(strategy, "SemiCMLPair", StandIns)
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    assert sorted(store.get_unlabeled_images()) == sorted(n for n in names if n != names[1])
    choose = strategy.ModalityDisagreement(strategy.ModalityDisagreementScoring(bundle))
    chosen = choose({"strategy": "modality_disagreement"}, store)
    assert chosen["id"] == names[-1]
    stored = {n: store.get_image_info(n).get(strategy.SCORE_KEY) for n in names}
    assert stored[names[1]] is None and chosen[strategy.SCORE_KEY] == min(v for v in stored.values() if v is not None)


def test_monai_label_training_uses_labelled_and_unlabelled_studies(brats_dir, tmp_path):
    """MedsslTrainTask on a real LocalDatastore (3 labelled, 2 unlabelled studies): the datastore is written as
    BraTS case folders (unlabelled studies without a seg, channels and affine kept), semi_cml's own train stage
    runs on it with the unlabelled studies in its datalist, and the new weights replace the served ones."""
    pytest.importorskip("monailabel", reason="MONAI Label is not installed (pip install -e '.[label]')")
    import json

    from medssl.label.trainer import MedsslTrainTask

    names, studies, store = _datastore(brats_dir, tmp_path, n=5, labelled=3)
    bundle = _served_copy("semi_cml", tmp_path)
    task = MedsslTrainTask(str(bundle), {})
    out = task({"max_epochs": 1, "epoch_length": 2, "val_interval": 1, "channels": [8, 16, 32, 64, 128],
                "device": "cpu"}, store)
    assert out["stages"] == ["train"] and out["labelled"] == names[:3] and out["unlabelled"] == names[3:]
    view = tmp_path / "semi_cml" / "monailabel" / "data"
    for n in names:
        flair = nib.load(view / n / f"{n}_flair.nii.gz")
        np.testing.assert_allclose(flair.affine, nib.load(studies / f"{n}.nii.gz").affine)
        assert (view / n / f"{n}_seg.nii.gz").is_file() == (n in names[:3])
    datalist = json.loads((Path(out["run"]) / "datalist.json").read_text())
    assert len(datalist["validation"]) == 1 and not datalist["test"]
    assert sorted(c["case"] for c in datalist["training"] if not c["labelled"]) == names[3:]
    served = bundle / "models"
    assert {"model.pt", "model_flair.pt", "model_t2.pt", "run.json"} <= {p.name for p in served.iterdir()}
    assert json.loads((served / "run.json").read_text())["settings"]["dataset_dir"] == str(view)


def test_monai_label_training_pretrains_on_every_study_then_fine_tunes(brats_dir, tmp_path):
    """A self-supervised bundle (context_restoration) with no pretrained weights served: MedsslTrainTask runs its
    pretrain stage on the training studies (the 2 unlabelled ones too; the validating study is held out, as the
    bundle's pretraining always holds out validation cases), fine-tunes from those weights on the labelled
    training study, and serves both the new model and the new pretrained weights."""
    pytest.importorskip("monailabel", reason="MONAI Label is not installed (pip install -e '.[label]')")
    import json

    from medssl.label.trainer import MedsslTrainTask

    names, _, store = _datastore(brats_dir, tmp_path, n=4, labelled=2)
    bundle = _served_copy("context_restoration", tmp_path)
    task = MedsslTrainTask(str(bundle), {})
    out = task({"max_epochs": 1, "epoch_length": 2, "val_interval": 1, "device": "cpu"}, store)
    assert out["stages"] == ["pretrain", "train"] and out["unlabelled"] == names[2:]
    run = Path(out["run"])
    pretrain = json.loads((run / "pretrain" / "run.json").read_text())
    assert pretrain["stage"] == "pretrain" and pretrain["settings"]["dataset_dir"].endswith("monailabel/data")
    trained = json.loads((run / "train" / "run.json").read_text())
    assert trained["settings"]["pretrained_ckpt"] == str(run / "pretrain" / "pretrained.pt")
    assert trained["run_settings"]["init"] == "method"
    served = bundle / "models"
    for name, src in (("model.pt", run / "train" / "model.pt"), ("pretrained.pt", run / "pretrain" / "pretrained.pt")):
        a, b = torch.load(served / name, weights_only=True), torch.load(src, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_monai_label_training_of_the_weak_bundle_learns_from_image_level_slice_tags(brats_dir, tmp_path):
    """cluster_resupervision through MedsslTrainTask: 2 studies segmented, 2 only tagged (their image info holds
    tumour / tumour-free axial slices, as PUT /datastore/image/info stores them). The view writes the tags
    beside the tagged studies, the training datalist carries them, and the bundle's training slices include
    exactly the tagged slices of those studies with their tags' classes."""
    pytest.importorskip("monailabel", reason="MONAI Label is not installed (pip install -e '.[label]')")
    from medssl.data import load_datalist, training_slices
    from medssl.label.trainer import MedsslTrainTask

    names, _, store = _datastore(brats_dir, tmp_path, n=4, labelled=2)
    tags = {}
    for name in names[2:]:
        area = (np.asarray(nib.load(brats_dir / name / f"{name}_seg.nii.gz").dataobj) > 0).sum(axis=(0, 1))
        tags[name] = {"tumour_slices": np.flatnonzero(area >= 50).tolist()[::2],
                      "tumour_free_slices": np.flatnonzero(area == 0).tolist()[::4]}
        store.update_image_info(name, tags[name])
    bundle = _served_copy("cluster_resupervision", tmp_path)
    out = MedsslTrainTask(str(bundle), {})({"max_epochs": 1, "epoch_length": 2, "batch_size": 4, "device": "cpu",
                                            "channels": [8, 16, 32, 64, 128]}, store)
    assert out["labelled"] == names[:2] and out["tagged"] == names[2:]
    run = Path(out["run"])
    datalist = load_datalist(run / "datalist.json", tmp_path / "cluster_resupervision" / "monailabel" / "data")
    assert sorted(c["case"] for c in datalist["training"] if "tags" in c) == names[2:]
    slices = training_slices(datalist, "image")
    for name in names[2:]:
        got = {s["slice"]: s["class"] for s in slices if s["case"] == name}
        assert got == {**{k: 1.0 for k in tags[name]["tumour_slices"]}, **{k: 0.0 for k in tags[name]["tumour_free_slices"]}}
    assert (bundle / "models" / "model.pt").is_file() and (run / "train" / "model.pt").is_file()
