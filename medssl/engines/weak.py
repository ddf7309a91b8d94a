"""Weakly supervised training from image-level labels on MONAI's SupervisedTrainer (Cluster-Re-Supervision)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from monai.engines.utils import IterationEvents

from .handlers import EvaluationReport, _unwrap
from .iteration import autocast, optimise
from .semi import sigmoid_rampup

# the bundle's `method` choices (train, evaluate and inference check against this one list):
# the paper's method, the plain-CAM classifier, and pixel supervision (the upper bound)
WEAK_METHODS = ("cluster_resupervision", "cam", "supervised")


def weak_or_supervised(method: str, weak, supervised):
    """``weak`` for a ``method`` trained from image-level labels (``cluster_resupervision``, ``cam``),
    ``supervised`` for the pixel-supervised upper bound (``supervised``): the bundle's switch between the
    two kinds of training (slices with or without pixel labels, the weak iteration or MONAI's default,
    the classifier gate of :class:`medssl.networks.CAMOutput`). An unknown ``method`` raises
    :func:`medssl.utils.check_choice`'s error naming :data:`WEAK_METHODS`."""
    from medssl.utils import choose

    return choose("method", method, **{m: supervised if m == "supervised" else weak for m in WEAK_METHODS})


class ClusterReSupervisionIteration:
    """``iteration_update`` for a :class:`medssl.networks.CAMSegNet` trained from image-level labels.

    ``loss = BCE(cls, class) + w(t) * resupervision_weight * resupervision(seg, features, cam, class, brain)
    + reconstruction_weight * mse(reconstruct(masked), x[:, target_channel])``

    - the classification term trains the CAM;
    - the re-supervision term (:class:`medssl.losses.ClusterReSupervisionLoss`) trains the refined-CAM
      head from k-means cluster maps of the pixel features, from ``start_iteration`` on (the CAM must
      mean something first), ramped up over ``rampup_iterations``; it gets the input ``image`` and
      ``model.classify``, with which its default contribution rule re-classifies each image with each
      cluster masked out (one batched forward pass without gradient);
    - the reconstruction term (inter-modality reconstruction, the auxiliary task that stabilises the
      features being clustered): the batch's ``masked_key`` image (random patches masked, e.g. by
      :class:`medssl.transforms.RandPatchMaskd`) with channel ``target_channel`` zeroed must be turned
      into that channel of the original image.

    ``resupervision=None`` (or weight 0) trains the classifier alone (the plain CAM baseline);
    ``reconstruction_weight=0`` is the ablation without the reconstruction module. Brain pixels
    (``image[:, 0] != 0``) are the ones clustered.
    """

    def __init__(self, resupervision=None, resupervision_weight: float = 1.0, reconstruction_weight: float = 0.0,
                 start_iteration: int = 0, rampup_iterations: int = 0, target_channel: int = 3,
                 image_key: str = "image", class_key: str = "class", masked_key: str = "masked_image"):
        self.resupervision = resupervision
        self.resupervision_weight = float(resupervision_weight) if resupervision is not None else 0.0
        self.reconstruction_weight = float(reconstruction_weight)
        self.start_iteration, self.rampup_iterations = int(start_iteration), int(rampup_iterations)
        self.target_channel = int(target_channel)
        self.image_key, self.class_key, self.masked_key = image_key, class_key, masked_key

    def __call__(self, engine, batchdata: dict) -> dict:
        device = engine.state.device
        image = batchdata[self.image_key].to(device)
        label = batchdata[self.class_key].to(device).float().reshape(-1)
        net = engine.network
        model = _unwrap(net)
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        out = engine.state.output = {"image": image, "class": label}
        with autocast(engine):
            heads = model.outputs(image)
            out["pred"] = heads["seg"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            zero = torch.zeros((), device=device)
            cls = F.binary_cross_entropy_with_logits(heads["cls"], label)
            resup = zero
            since = engine.state.iteration - self.start_iteration
            if self.resupervision_weight and since >= 0:
                w = sigmoid_rampup(since, self.rampup_iterations) * self.resupervision_weight
                resup = w * self.resupervision(heads["seg"], heads["features"], heads["cam"], label, image[:, 0] != 0,
                                               image=image, classifier=model.classify)
            rec = zero
            if self.reconstruction_weight:
                masked = batchdata[self.masked_key].to(device).clone()
                masked[:, self.target_channel] = 0
                target = image[:, self.target_channel : self.target_channel + 1]
                rec = self.reconstruction_weight * F.mse_loss(model.reconstruct(masked), target)
            out.update(loss=cls + resup + rec, classification_loss=cls, resupervision_loss=resup, reconstruction_loss=rec)
        return optimise(engine, out)


class WeakSegReport(EvaluationReport):
    """Attach to an evaluator over 2D slices with pixel labels (evaluation only): at completion write
    ``output_file`` (JSON, atomically) with the two failure modes weak supervision targets reported
    separately:

    - ``dice`` / ``hd95`` (``{region: value}`` and ``mean_*``): over *tumour slices* (image-level class 1,
      i.e. at least the area threshold of tumour); HD95 in pixels, a slice without prediction skipped;
    - ``under_segmentation``: mean over tumour slices of missed tumour / tumour area (FN / |GT|);
    - ``over_segmentation``: mean over tumour slices of predicted non-tumour / tumour area (FP / |GT|);
    - ``false_positive_rate``: fraction of *tumour-free* slices (no tumour pixel) with any predicted pixel.

    Slices with a little tumour below the threshold count in neither group. Reads ``pred`` and ``label``
    (binary ``(1, H, W)``) from the decollated output and ``class_key`` / ``area_key`` from the batch.
    """

    def __init__(self, output_file: str, region: str = "WT", class_key: str = "class", area_key: str = "tumour_pixels",
                 extra: dict | None = None):
        self.output_file, self.region = output_file, region
        self.class_key, self.area_key = class_key, area_key
        self.extra = dict(extra or {})
        self.rows: list[dict] = []

    def reset(self) -> None:
        self.rows.clear()

    def _collect(self, engine) -> None:
        from monai.metrics import compute_hausdorff_distance

        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for item, out in zip(batch, engine.state.output):
            pred, gt = out["pred"].detach().bool().reshape(-1), out["label"].detach().bool().reshape(-1)
            area = int(gt.sum())
            row = {"case": item.get("case"), "slice": int(item.get("slice", -1)), "tumour": float(item[self.class_key]) > 0.5,
                   "free": int(item.get(self.area_key, area)) == 0, "predicted": int(pred.sum())}
            if row["tumour"]:
                tp = int((pred & gt).sum())
                row["dice"] = 2 * tp / max(area + row["predicted"], 1)
                row["under"] = (area - tp) / area
                row["over"] = (row["predicted"] - tp) / area
                hd = compute_hausdorff_distance(out["pred"][None].float(), out["label"][None].float(), percentile=95)
                row["hd95"] = float(hd) if row["predicted"] and math.isfinite(float(hd)) else None
            self.rows.append(row)

    def __call__(self, engine) -> None:
        import numpy as np

        from ..utils import atomic_write_json

        tumour = [r for r in self.rows if r["tumour"]]
        free = [r for r in self.rows if r["free"]]

        def mean(key):
            v = [r[key] for r in tumour if r.get(key) is not None]
            return round(float(np.mean(v)), 6) if v else None

        report = {"num_cases": len(self.rows), "num_tumour_slices": len(tumour), "num_tumour_free_slices": len(free),
                  "dice": {self.region: mean("dice")}, "mean_dice": mean("dice"),
                  "hd95": {self.region: mean("hd95")}, "mean_hd95": mean("hd95"),
                  "under_segmentation": mean("under"), "over_segmentation": mean("over"),
                  "false_positive_rate": round(sum(r["predicted"] > 0 for r in free) / len(free), 6) if free else None,
                  "hd95_unit": "pixels", **self.extra, "per_slice": self.rows}
        atomic_write_json(report, self.output_file)
