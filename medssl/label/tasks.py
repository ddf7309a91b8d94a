"""The MONAI Label app of medssl: one infer task and one train task per served bundle (needs monailabel).

``monailabel start_server --app <medssl/label/app> --studies DIR --conf models_dir M --conf bundles a,b
--conf kind brats`` loads ``medssl/label/app/main.py``, whose app class is :class:`MedsslApp`. ``medssl label
serve`` prepares ``DIR`` and ``M`` (:func:`medssl.label.prepare_studies`,
:func:`medssl.label.materialise_bundles`) and starts that command.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

from ..bundles import set_config_id
from . import SERVED_FILE, SERVING, study_problem, weights_settings

logger = logging.getLogger(__name__)


class MedsslInferTask(BundleInferTask):
    """MONAI Label's :class:`BundleInferTask` for a medssl bundle served on ``kind`` studies.

    On top of the stock task: the label values of the written map and the dimension are those the bundle's
    postprocessing produces (:data:`medssl.label.SERVING`; the metadata's ``channel_def`` names the network's
    output channels); the network is the config's ``network`` (e.g. cluster_resupervision's CAM-to-mask
    wrapper around ``network_def``), built with the settings the served weights' run recorded (a MONAI Label
    training may have changed e.g. ``channels``: the network is rebuilt when the weights change), with the
    weights loaded strictly by
    :func:`medssl.networks.load_pretrained` (a checkpoint of another network is refused naming the file);
    and a request whose image cannot be segmented by the model is answered HTTP 422 naming the image and
    what was expected, before anything runs (:func:`medssl.label.study_problem`).
    """

    def __init__(self, path: str, conf: dict, kind: str = "brats", **kwargs):
        self.medssl_name = Path(path).name
        self.kind = kind
        spec = SERVING[self.medssl_name][kind]
        super().__init__(path, conf, load_strict=True, **kwargs)
        if self.valid:
            self.labels = dict(spec["labels"])
            self.dimension = spec["dimension"]

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if isinstance(image, str):
            problem = study_problem(image, self.medssl_name, self.kind)
            if problem:
                raise HTTPException(status_code=404 if not os.path.exists(image) else 422, detail=problem)
        return super().__call__(request, callbacks)

    def writer(self, data, extension=None, dtype=None):
        import numpy as np

        if self.dimension == 2 and str(data.get("image_path", "")).lower().endswith(".png"):
            return self._write_png(data)
        return super().writer(data, extension, dtype or np.uint8)  # label values, not probabilities

    def _write_png(self, data):
        """A 2-D label map as a PNG of the input picture's size (MONAI reads pictures as (W, H); PIL writes
        (H, W) arrays)."""
        import tempfile

        import numpy as np
        from PIL import Image

        pred = data[self.output_label_key]
        arr = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred)
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
        out = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        Image.fromarray(arr.T.astype(np.uint8)).save(out)
        return out, data.get(self.output_json_key, {})

    def _get_network(self, device, data):
        from monai.bundle import ConfigParser

        from ..networks import load_pretrained

        path = self.get_path()
        stat = os.stat(path)
        cached = self._networks.get(device)
        if cached and cached[1] == stat.st_mtime:
            return cached[0]
        config = copy.deepcopy(self.bundle_config.config)
        for k, v in weights_settings(self.medssl_name, Path(path).parent).items():  # a training may change them
            set_config_id(config, k, v)
        parser = ConfigParser(config)
        parser["bundle_root"] = self.bundle_path
        parser["device"] = f"$torch.device({str(device)!r})"
        parser.parse()
        inner = parser.get_parsed_content("network_def")
        load_pretrained(inner, path, allow_head_mismatch=False)
        network = parser.get_parsed_content("network").to(torch.device(device))  # wraps the same ``inner``
        network.train() if self.train_mode else network.eval()
        self._networks[device] = (network, stat.st_mtime)
        return network


def _optional(module: str, name: str):
    """``medssl.label.<module>.<name>`` where that module exists and imports (it is written separately), else
    None (logged)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"medssl.label.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name != f"medssl.label.{module}":
            logger.warning("medssl.label.%s cannot be imported (%s): MONAI Label's stock task is used", module, e)
        return None
    except (ImportError, AttributeError) as e:
        logger.warning("medssl.label.%s.%s unavailable (%s): MONAI Label's stock task is used", module, name, e)
        return None


def _is_upload(path: str) -> bool:
    """Whether ``path`` is where MONAI Label's /infer/ endpoint put an uploaded file (``tempfile.NamedTemporaryFile``
    in the temp folder, named ``tmp...``)."""
    import tempfile

    p = Path(path)
    return p.is_absolute() and p.parent == Path(tempfile.gettempdir()) and p.name.startswith("tmp") and p.is_file()


class MedsslApp(MONAILabelApp):
    """The medssl bundles as MONAI Label models. ``conf``: ``models_dir`` (the bundle folders
    :func:`medssl.label.materialise_bundles` wrote, with ``served.json``; default ``<app>/model``),
    ``bundles`` (comma-separated; default every folder there), ``kind`` (``brats`` or ``nuclei``, the
    studies' kind), ``skip_trainers`` (``true``: no train tasks)."""

    def __init__(self, app_dir, studies, conf):
        import medssl

        self.models_dir = Path(conf.get("models_dir") or Path(app_dir) / "model")
        record_file = self.models_dir / SERVED_FILE
        self.served = json.loads(record_file.read_text()) if record_file.is_file() else {}
        names = [n for n in conf.get("bundles", "").split(",") if n] or sorted(
            p.name for p in self.models_dir.glob("*") if (p / "configs" / "inference.json").is_file())
        self.kind = conf.get("kind", "brats")
        self.bundle_names = names
        self.not_served = {n: self.served.get(n, {}).get("reason") for n in names
                           if self.served.get(n, {}).get("served") is False}
        for n in names:
            if n not in self.not_served and n in SERVING and self.kind not in SERVING[n]:
                self.not_served[n] = f"does not serve {self.kind} studies"
            elif n not in self.not_served and not (self.models_dir / n / "models" / "model.pt").is_file():
                self.not_served[n] = f"no weights ({self.models_dir / n / 'models' / 'model.pt'} missing)"
        for n, reason in self.not_served.items():
            logger.warning("medssl: bundle %s is not served: %s", n, reason)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name=f"medssl {medssl.__version__}",
                         description="Label-efficient segmentation bundles of medssl", version=medssl.__version__)

    def _served_names(self):
        return [n for n in self.bundle_names if n not in self.not_served]

    def init_infers(self):
        infers = {}
        for n in self._served_names():
            task = MedsslInferTask(str(self.models_dir / n), self.conf, kind=self.kind)
            if task.is_valid():
                infers[n] = task
                logger.info("+++ medssl infer task: %s (%s studies)", n, self.kind)
            else:
                self.not_served[n] = "MONAI Label's BundleInferTask refused the bundle folder (see the log)"
        return infers

    def init_trainers(self):
        from monailabel.utils.others.generic import strtobool

        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        # Hook: medssl.label.trainer.MedsslTrainTask (written separately) also passes the studies without a
        # label to the semi-/self-supervised bundles; without it, MONAI Label's own BundleTrainTask
        # (labelled [{image, label}] pairs only).
        trainer_class = _optional("trainer", "MedsslTrainTask") or BundleTrainTask
        trainers = {}
        for n in self._served_names():
            t = trainer_class(str(self.models_dir / n), self.conf)
            if t.is_valid():
                trainers[n] = t
        return trainers

    def _disagreement_scoring(self):
        """medssl.label.strategy's modality-disagreement scoring on the served semi_cml (both modality
        networks' weights needed), or None."""
        scoring_class = _optional("strategy", "ModalityDisagreementScoring")
        semi = self.models_dir / "semi_cml"
        if scoring_class is None or "semi_cml" not in self._served_names() or not all(
                (semi / "models" / f"model_{m}.pt").is_file() for m in ("flair", "t2")):
            return None
        return scoring_class(semi, device="cuda" if torch.cuda.is_available() else "cpu")

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        strategies = {"random": Random(), "first": First()}
        # Hook: medssl.label.strategy (written separately): the study semi_cml's FLAIR and T2 networks disagree on most.
        scoring = self._disagreement_scoring()
        if scoring is not None:
            strategies["modality_disagreement"] = _optional("strategy", "ModalityDisagreement")(scoring)
        return strategies

    def init_scoring_methods(self):
        scoring = self._disagreement_scoring()
        return {"modality_disagreement": scoring} if scoring is not None else {}

    def info(self):
        meta = super().info()
        meta["medssl"] = {"kind": self.kind, "served": sorted(meta["models"]), "not_served": dict(self.not_served)}
        return meta

    def infer(self, request, datastore=None):
        model, image = request.get("model"), request.get("image")
        if model and model not in self._infers:
            why = self.not_served.get(model)
            raise HTTPException(status_code=404, detail=f"model {model!r} is not served" + (f": {why}" if why else "")
                                + f"; expected one of {sorted(self._infers)}")
        if isinstance(image, str):  # an uploaded file arrives as a server-side temp path set by MONAI Label
            if not image.strip():
                raise HTTPException(status_code=400, detail="no image given; expected image=<the id of one of the "
                                                            f"datastore's images ({self.studies})>")
            store = datastore or self.datastore()
            # a datastore id, or the temp file MONAI Label wrote for an uploaded image; any other path (existing or
            # not, e.g. /etc/passwd) is refused before anything is read
            if not _is_upload(image) and not store.get_image_uri(image):
                raise self._not_in_datastore(image)
        return super().infer(request, datastore)

    def init_datastore(self):
        """MONAI Label's datastore, whose ``save_label`` answers 404 for an image id it does not hold (PUT
        /datastore/label?image=<unknown>: MONAI Label's own ImageNotFoundException came back as a 500 or a
        422), before anything is written."""
        store = super().init_datastore()
        save = store.save_label

        def save_label(image_id, label_filename, label_tag, label_info):
            if not store.get_image_uri(image_id):
                raise self._not_in_datastore(image_id)
            return save(image_id, label_filename, label_tag, label_info)

        store.save_label = save_label
        return store

    def _not_in_datastore(self, image) -> HTTPException:
        return HTTPException(status_code=404, detail=f"no image {image!r} in the datastore ({self.studies}); "
                                                     f"expected the id of one of its images")

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404, detail=f"no active-learning strategy {strategy!r}; expected one of "
                                                        f"{sorted(self._strategies)}")
        return super().next_sample(request)
