"""Which unlabelled study to annotate next: the one where semi_cml's two modality networks disagree most.

semi_cml (Zhang et al. 2023) trains one network per MR modality (FLAIR, T2) to segment the same whole
tumour. Where the two agree, a label adds little; where they disagree, at least one is wrong - the study
an annotator's time is best spent on. The score of a study is the Dice between the two networks'
whole-tumour masks (lower = more disagreement; two empty masks agree: Dice 1). This module has no MONAI
Label import: :mod:`medssl.label.strategy` wraps it as a MONAI Label scoring method and strategy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..data import BRATS_MODALITIES, DataError

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (1, 1, *spatial) image -> (1, 1, *spatial) logits


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two binary masks of the same shape; 1.0 where both are empty (they agree)."""
    a, b = a.bool(), b.bool()
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def modality_dice(image: torch.Tensor, predictors: Mapping[str, Predictor], channels: Mapping[str, int],
                  threshold: float = 0.5) -> float:
    """The Dice between the masks two modality networks predict on one study. ``image``: ``(C, *spatial)``,
    normalised as the networks were trained; ``predictors``: modality -> network (logits); ``channels``:
    modality -> its channel of ``image``. Each network sees only its own channel."""
    if len(predictors) != 2:
        raise ValueError(f"expected the two modality networks of semi_cml, got {sorted(predictors)}")
    masks = []
    with torch.no_grad():
        for name, predict in predictors.items():
            x = image[channels[name]: channels[name] + 1].unsqueeze(0).float()
            masks.append(torch.sigmoid(predict(x))[0, 0] > threshold)
    return mask_dice(*masks)


def rank_by_disagreement(scores: Mapping[str, float]) -> list[str]:
    """Study ids from most to least disagreement (lowest Dice first; ties by id, so the order is stable)."""
    return sorted(scores, key=lambda k: (scores[k], k))


class SemiCMLPair:
    """semi_cml's two trained modality networks, loaded from a bundle folder (``configs/inference.json``,
    ``models/model_<modality>.pt``; settings recorded in ``models/run.json`` applied, as
    ``medssl run ... inference --ckpt_dir`` does), with the bundle's own preprocessing and sliding-window
    inferer: :meth:`dice` scores one study file (a 4-channel BraTS NIfTI, channels in
    :data:`medssl.data.BRATS_MODALITIES` order, as ``medssl label serve`` writes them)."""

    def __init__(self, bundle_dir: str | Path, device: str = "cpu", modalities: Sequence[str] | None = None):
        from monai.bundle import ConfigParser

        from ..networks import load_pretrained

        self.bundle_dir = Path(bundle_dir)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        record = self.bundle_dir / "models" / "run.json"
        if record.is_file():  # a served copy of a trained run: its network sizes
            settings = json.loads(record.read_text()).get("settings", {})
            parser.update({k: v for k, v in settings.items() if k in ("channels", "dropout")})
        parser.update({"bundle_root": str(self.bundle_dir), "device": f"$torch.device('{device}')"})
        self.modalities = list(modalities or parser.get_parsed_content("modalities"))
        missing = [m for m in self.modalities if m not in BRATS_MODALITIES]
        if missing:
            raise ValueError(f"{self.bundle_dir}: modalities {missing} are not BraTS modalities {BRATS_MODALITIES}")
        self.channels = {m: BRATS_MODALITIES.index(m) for m in self.modalities}
        self.nets = {}
        for m in self.modalities:
            net = parser.get_parsed_content("network_def", lazy=False, instantiate=True)
            self.nets[m] = load_pretrained(net, self.bundle_dir / "models" / f"model_{m}.pt",
                                           allow_head_mismatch=False).to(device).eval()
        self.inferer = parser.get_parsed_content("inferer")
        # the image pipeline (load, channel first, orientation, normalisation) on every channel: without the
        # step that picks the served modality's channel out of a 4-channel study
        from monai.transforms import Compose

        from ..transforms import SelectModalityd

        steps = parser.get_parsed_content("preprocessing").transforms
        self.preprocessing = Compose([t for t in steps if not isinstance(t, SelectModalityd)])
        self.device = device

    def load(self, path: str | Path) -> torch.Tensor:
        image = self.preprocessing({"image": str(path)})["image"]
        if image.shape[0] != len(BRATS_MODALITIES):
            raise DataError([f"{path}: {image.shape[0]} channel(s); expected a {len(BRATS_MODALITIES)}-channel BraTS "
                             f"study ({', '.join(BRATS_MODALITIES)}), as `medssl label serve` writes them"])
        return image

    def dice(self, path: str | Path) -> float:
        image = self.load(path).to(self.device)
        predictors = {m: (lambda x, net=net: self.inferer(x, net)) for m, net in self.nets.items()}
        return modality_dice(image, predictors, self.channels)
