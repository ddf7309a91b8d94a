"""MONAI Label active learning by modality disagreement (:mod:`medssl.label.disagreement`): a scoring method
that stores, for each unlabelled study, the Dice between semi_cml's FLAIR and T2 networks' whole-tumour
masks in the datastore (``modality_dice``), and a strategy that serves the study with the lowest one - the
study the two modality networks disagree on most. MONAI Label's stock apps offer random, first and epistemic
(MC-dropout entropy) selection; none uses two views of the same study."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .disagreement import SemiCMLPair, rank_by_disagreement

logger = logging.getLogger(__name__)

SCORE_KEY = "modality_dice"


class ModalityDisagreementScoring(ScoringMethod):
    """Score every unlabelled study (or those not scored yet for the current model) with
    :meth:`SemiCMLPair.dice` and store it in the datastore's image info as ``modality_dice`` (with the
    model file's time, so a retrained model rescores). ``bundle_dir``: the served semi_cml bundle folder."""

    def __init__(self, bundle_dir: str | Path, device: str = "cpu"):
        super().__init__("Dice between semi_cml's FLAIR and T2 networks on each unlabelled study")
        self.bundle_dir, self.device = Path(bundle_dir), device

    def _model_stamp(self) -> float:
        return max(p.stat().st_mtime for p in (self.bundle_dir / "models").glob("model_*.pt"))

    def __call__(self, request, datastore: Datastore) -> dict:
        stamp = self._model_stamp()
        todo = [i for i in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
                if datastore.get_image_info(i).get(f"{SCORE_KEY}_model") != stamp]
        if not todo:
            return {}
        pair = SemiCMLPair(self.bundle_dir, self.device)
        scores = {}
        for image in todo:
            scores[image] = round(pair.dice(datastore.get_image_uri(image)), 6)
            datastore.update_image_info(image, {SCORE_KEY: scores[image], f"{SCORE_KEY}_model": stamp})
        logger.info(f"{SCORE_KEY}: scored {len(scores)} unlabelled studies: {scores}")
        return scores


class ModalityDisagreement(Strategy):
    """Serve the unlabelled study whose two modality networks agree least (lowest ``modality_dice``),
    scoring those not scored yet first (:class:`ModalityDisagreementScoring`)."""

    def __init__(self, scoring: ModalityDisagreementScoring):
        super().__init__("Study where semi_cml's FLAIR and T2 networks disagree most (lowest Dice between them)")
        self.scoring = scoring

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        self.scoring(request, datastore)
        scores = {i: datastore.get_image_info(i).get(SCORE_KEY) for i in images}
        chosen = rank_by_disagreement({i: s for i, s in scores.items() if s is not None})[0]
        logger.info(f"modality disagreement: {chosen} (Dice {scores[chosen]}) of {len(images)} unlabelled studies")
        return {"id": chosen, SCORE_KEY: scores[chosen]}
