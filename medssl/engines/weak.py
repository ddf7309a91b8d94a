"""Weakly supervised training from image-level labels on MONAI's SupervisedTrainer (Cluster-Re-Supervision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai.engines.utils import IterationEvents

from .handlers import _unwrap
from .iteration import optimise
from .semi import sigmoid_rampup


class ClusterReSupervisionIteration:
    """``iteration_update`` for a :class:`medssl.networks.CAMSegNet` trained from image-level labels.

    ``loss = BCE(cls, class) + w(t) * resupervision_weight * resupervision(seg, features, cam, class, brain)
    + reconstruction_weight * mse(reconstruct(masked), x[:, target_channel])``

    - the classification term trains the CAM;
    - the re-supervision term (:class:`medssl.losses.ClusterReSupervisionLoss`) trains the refined-CAM
      head from k-means cluster maps of the pixel features, from ``start_iteration`` on (the CAM must
      mean something first), ramped up over ``rampup_iterations``;
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
        heads = model.outputs(image)
        out["pred"] = heads["seg"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        zero = torch.zeros((), device=device)
        cls = F.binary_cross_entropy_with_logits(heads["cls"], label)
        resup = zero
        since = engine.state.iteration - self.start_iteration
        if self.resupervision_weight and since >= 0:
            w = sigmoid_rampup(since, self.rampup_iterations) * self.resupervision_weight
            resup = w * self.resupervision(heads["seg"], heads["features"], heads["cam"], label, image[:, 0] != 0)
        rec = zero
        if self.reconstruction_weight:
            masked = batchdata[self.masked_key].to(device).clone()
            masked[:, self.target_channel] = 0
            target = image[:, self.target_channel : self.target_channel + 1]
            rec = self.reconstruction_weight * F.mse_loss(model.reconstruct(masked), target)
        out.update(loss=cls + resup + rec, classification_loss=cls, resupervision_loss=resup, reconstruction_loss=rec)
        return optimise(engine, out)
