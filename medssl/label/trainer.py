"""MONAI Label train task for medssl bundles: every study of the datastore, labelled or not.

MONAI Label's stock ``BundleTrainTask`` hands a bundle only the labelled ``[{image, label}]`` pairs (it
overrides ``train#dataset#data``). Self- and semi-supervised bundles are built for the other studies too,
so :class:`MedsslTrainTask` instead writes the datastore as a data set in the bundle's own layout
(:func:`medssl.label.view.write_view`: studies without a label become unlabelled cases), splits it (all
labelled studies train or validate, ``val_split`` of them validate, none is held out for test; every
unlabelled study trains; the weakly supervised cluster_resupervision also learns from the unlabelled studies'
image-level slice tags, ``tumour_slices`` / ``tumour_free_slices`` in their image info,
:mod:`medssl.data.tags`) and runs the bundle's own stages on it through ``monai.bundle run``:
``pretrain`` on every training study, labelled or not, where the bundle has one (when asked, or when no
pretrained weights are served yet), then ``train`` - semi_cml's unlabelled stream and the pretext tasks see the unlabelled
studies. The new weights (and ``run.json``) replace the served ones atomically, so the next inference
uses them (MONAI Label reloads a model whose file changed).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

from ..bundles import bundle_stages, format_config, inference_weights, run_stage, set_config_id, stage_settings_of
from ..data import LAYOUTS, DataError, make_split, write_datalist
from ..utils import atomic_write
from . import weights_settings
from .view import write_view

logger = logging.getLogger(__name__)


class MedsslTrainTask(BundleTrainTask):
    """Train the medssl bundle in folder ``path`` (MONAI Label's ``<app>/model/<name>``) on the datastore:
    labelled and unlabelled studies (module docstring). Request options (``config()``): ``max_epochs``,
    ``val_split``, ``pretrain`` (run the bundle's pretrain stage first), ``device``, and any setting of
    the bundle's train stage by its id (e.g. ``epoch_length``, ``learning_rate``)."""

    def __init__(self, path: str, conf: dict | None = None, **kwargs):
        super().__init__(path, conf or {}, **kwargs)
        self.root = Path(path)

    def config(self):
        options = super().config()
        options.update({"max_epochs": 20, "val_split": 0.2, "pretrain": False})
        for k in ("multi_gpu", "gpus", "tracking", "tracking_uri", "tracking_experiment_name", "run_id", "model_filename"):
            options.pop(k, None)
        return options

    def _device(self, request) -> str:
        wanted = str(request.get("device") or "cuda")
        wanted = wanted[0] if isinstance(request.get("device"), list) else wanted
        return wanted if wanted.startswith("cuda") and torch.cuda.is_available() else "cpu"

    def __call__(self, request, datastore: Datastore):
        work = self.root / "monailabel"
        view = write_view(datastore, work / "data")
        cases = LAYOUTS[view["layout"]](work / "data")
        n_lab = len(view["labelled"])
        if n_lab < 2:
            raise DataError([f"{self.root.name}: {n_lab} labelled studies of {n_lab + len(view['unlabelled'])}; "
                             "expected at least 2 (one trains, one validates): submit more labels first"])
        n_val = min(max(1, round(float(request.get("val_split", 0.2)) * n_lab)), n_lab - 1)
        split = make_split(cases, val_fraction=n_val / n_lab, test_fraction=0.0, seed=int(request.get("seed", 0)))
        run_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
        datalist = write_datalist(split, run_dir / "datalist.json", work / "data")
        logger.info(f"{self.root.name}: training on {n_lab} labelled and {len(view['unlabelled'])} unlabelled "
                    f"studies ({len(view['tagged'])} of them with image-level slice tags; {len(split['validation'])} "
                    f"validate) -> {run_dir}")
        common = {"dataset_dir": str(work / "data"), "datalist_file": str(datalist),
                  "device": f"$torch.device('{self._device(request)}')"}
        served = self._served()
        if "dataset_name" in served:  # the data variant it is served for (dfr_barlow: BraTS slices or nuclei)
            common["dataset_name"] = served["dataset_name"]
        stages = []
        pretrained = self.root / "models" / "pretrained.pt"
        if "pretrain" in bundle_stages(self.root) and (request.get("pretrain") or not pretrained.is_file()):
            run_stage(self.root, "pretrain", ckpt_dir=str(run_dir / "pretrain"), **common,
                      **self._settings("pretrain", request))
            pretrained = run_dir / "pretrain" / "pretrained.pt"
            stages.append("pretrain")
        start = {"pretrained_ckpt": str(pretrained)} if "pretrained_ckpt" in stage_settings_of(self.root, "train") else {}
        run_stage(self.root, "train", ckpt_dir=str(run_dir / "train"), **common, **start,
                  **self._settings("train", request))
        stages.append("train")
        published = self._publish(run_dir, stages, served)
        return {"run": str(run_dir), "stages": stages, "labelled": view["labelled"], "unlabelled": view["unlabelled"],
                "tagged": view["tagged"], "published": published}

    def _settings(self, stage: str, request) -> dict:
        own = stage_settings_of(self.root, stage)
        chosen = {k: v for k, v in request.items() if k in own and k not in ("device", "dataset_dir", "datalist_file",
                                                                             "ckpt_dir", "bundle_root")}
        return {"max_epochs": int(request.get("max_epochs", 20)), **chosen}

    def _served(self) -> dict:
        """The served ``configs/inference.json`` (``medssl label serve`` writes the study kind's settings in it)."""
        return json.loads((self.root / "configs" / "inference.json").read_text())

    def _publish(self, run_dir: Path, stages, served: dict) -> list[str]:
        """Copy the run's weights into the served ``models/`` and its network settings into the served
        ``inference.json``, ``model.pt`` last (the file inference watches; it rebuilds the network from them):
        the network inference builds - for semi_cml, whose training keeps both modality networks, the served
        ``modality``'s own ``model_<modality>.pt``."""
        models, train = self.root / "models", run_dir / "train"
        files = sorted(train.glob("model_*.pt")) + [train / "run.json"]
        if "pretrain" in stages:
            files.append(run_dir / "pretrain" / "pretrained.pt")
        files = [(f, f.name) for f in files if f.is_file() and not f.name.startswith("model_step")]
        for src, name in files:
            atomic_write(models / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        for k, v in weights_settings(self.root.name, models).items():  # the served config matches the new weights
            set_config_id(served, k, v)
        atomic_write(self.root / "configs" / "inference.json",
                     lambda tmp: Path(tmp).write_text(format_config(served) + "\n"))
        atomic_write(models / "model.pt", lambda tmp: shutil.copyfile(inference_weights(train, served), tmp))
        return [name for _, name in files] + ["model.pt"]
