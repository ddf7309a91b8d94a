"""Axial BraTS slices with image-level labels, for weakly supervised segmentation (issue 6).

The image-level label of a slice ("tumour present") is derived from the segmentation at data-preparation
time, by an area threshold; :func:`weak_slice_datalist` then keeps the pixel labels ONLY in the
validation and test slices (for evaluation): a training slice carries ``class`` and never ``label``, and
:func:`image_level_only` refuses a training list that does.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from .check import DataError
from .tags import axial_tags


@functools.lru_cache(maxsize=64)
def _volume(images: tuple[str, ...], label: str | None, tags: str | None = None):
    """(4, H, W, D) z-normalised float32 image (RAS, per channel over the brain), (H, W, D) seg (or None),
    and the ``tags`` file's image-level labels by RAS axial slice (or None)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd

    keys = ["image"] + (["label"] if label else [])
    d = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)])(
        {"image": list(images), **({"label": label} if label else {})})
    by_slice = axial_tags(tags, d["image"].shape[1:], d["image"].affine) if tags else None
    d = Compose([Orientationd(keys, axcodes="RAS"), NormalizeIntensityd("image", nonzero=True, channel_wise=True)])(d)
    seg = np.asarray(d["label"][0]) if label else None
    return np.asarray(d["image"], dtype=np.float32), seg, by_slice


def brats_axial_slices(cases: Sequence[dict], area_threshold: int = 50, with_pixel_labels: bool = False,
                       min_brain_fraction: float = 0.05, use_tags: bool = False) -> list[dict]:
    """One item per axial slice of every case that shows brain (at least ``min_brain_fraction`` of its
    pixels non-zero in the first modality):
    ``{"image": (C, H, W) float32, "class": 1.0 if the whole tumour covers >= area_threshold pixels else 0.0,
    "case", "slice", "tumour_pixels"}``, plus ``"label": (1, H, W)`` whole-tumour mask when
    ``with_pixel_labels`` (evaluation only). Volumes are z-normalised per channel over the brain first.
    With ``use_tags``, a case that carries annotator ``tags`` (:mod:`medssl.data.tags`) instead gives its
    tagged slices only, ``class`` from the tags (``tumour_pixels`` -1: not measured).
    """
    out = []
    for case in cases:
        tagged = use_tags and "tags" in case
        image, seg, tags = _volume(tuple(case["image"]), None if tagged else case.get("label"),
                                   case["tags"] if tagged else None)
        if tagged:
            for z in sorted(tags):
                out.append({"image": np.ascontiguousarray(image[..., z]), "class": tags[z],
                            "case": case.get("case", ""), "slice": int(z), "tumour_pixels": -1})
            continue
        if seg is None:
            raise DataError([f"{case.get('case', case['image'][0])}: no segmentation; expected a seg file to "
                             "derive the image-level labels from (or a <case>_tags.json of slice tags)"])
        wt = seg > 0
        brain = (image[0] != 0).mean(axis=(0, 1))
        area = wt.sum(axis=(0, 1))
        for z in np.flatnonzero(brain >= min_brain_fraction):
            item = {"image": np.ascontiguousarray(image[..., z]), "class": float(area[z] >= area_threshold),
                    "case": case.get("case", ""), "slice": int(z), "tumour_pixels": int(area[z])}
            if with_pixel_labels:
                item["label"] = wt[None, ..., z].astype(np.float32)
            out.append(item)
    return out


@functools.lru_cache(maxsize=256)
def axial_brain_slices(image: str, min_brain_fraction: float = 0.05) -> tuple[int, ...]:
    """The RAS axial indices (the last axis after ``Orientation("RAS")``, as the bundles load a volume) of the
    slices of the volume ``image`` (one modality's file) that show brain: at least ``min_brain_fraction`` of
    their pixels non-zero (as :func:`brats_axial_slices` counts them)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    vol = np.asarray(Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])(image))[0]
    return tuple(int(z) for z in np.flatnonzero((vol != 0).mean(axis=(0, 1)) >= min_brain_fraction))


def label_slices(datalist: dict, label_fraction: float, seed: int | None = None,
                 min_brain_fraction: float = 0.05) -> dict:
    """``datalist`` (a case-level split of BraTS volumes, :func:`medssl.data.make_split` / ``make_fold``) with
    the labels of a ``label_fraction`` of the *slices* of ALL its training volumes instead of whole volumes
    (``label_unit`` ``"slice"``, for 2D networks trained on axial slices).

    Of the ``total`` brain-showing axial slices (:func:`axial_brain_slices`) of the training volumes that have a
    segmentation, ``max(1, round(label_fraction * total))`` are labelled, spread over the volumes: each volume's
    slices in a seeded random order, taken round robin over the volumes (in a seeded order), so every volume
    has a labelled slice as soon as there are as many labelled slices as volumes, and the per-volume counts
    differ by at most one (until a volume runs out). The order depends only on the seed (default: the
    datalist's ``seed``) and ``fold``, not on the fraction, so the labelled slices are nested across fractions.
    A training volume with labelled slices gets ``"labelled": true`` and ``"labelled_slices"`` (sorted RAS axial
    indices: only those slices' labels may be used, ``medssl.transforms.SelectSlicesd``); the others
    ``"labelled": false``. Validation and test are unchanged (whole volumes, never labelled for training).
    The datalist gets ``"label_unit": "slice"``.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    training = datalist["training"]
    not_volumes = [c.get("case", c["image"]) for c in training if not isinstance(c["image"], (list, tuple))]
    if not_volumes:
        raise ValueError(f"label_unit 'slice' needs BraTS volumes (a list of modality files per case); "
                         f"{not_volumes[0]!r} is a single 2D image: use the case-level split")
    segmented = sorted((c for c in training if "label" in c), key=lambda c: c["case"])
    slices = {c["case"]: axial_brain_slices(str(c["image"][0]), float(min_brain_fraction)) for c in segmented}
    total = sum(len(v) for v in slices.values())
    if total == 0:
        raise DataError([f"no training volume with a segmentation and a brain slice ({len(training)} training "
                         "case(s)); expected at least one to label slices of"])
    seed = int(datalist.get("seed", 0) if seed is None else seed)
    rng = np.random.RandomState([seed, int(datalist.get("fold", 0)), 1])
    per_volume = [list(np.asarray(slices[c["case"]])[rng.permutation(len(slices[c["case"]]))])
                  for c in segmented]
    volumes = rng.permutation(len(segmented))
    order = [(segmented[v]["case"], int(per_volume[v][r])) for r in range(max(map(len, per_volume)))
             for v in volumes if r < len(per_volume[v])]
    chosen: dict[str, list[int]] = {}
    for case, z in order[:max(1, int(round(label_fraction * total)))]:
        chosen.setdefault(case, []).append(z)

    def flagged(c):
        c = {k: v for k, v in c.items() if k != "labelled_slices"}
        if c.get("case") in chosen and "label" in c:
            return dict(c, labelled=True, labelled_slices=sorted(chosen[c["case"]]))
        return dict(c, labelled=False)

    return {**datalist, "label_fraction": label_fraction, "label_unit": "slice",
            "training": [flagged(c) for c in training]}


def image_level_only(items: Sequence[dict], context: str = "training slices") -> list[dict]:
    """``items`` unchanged if none carries a pixel ``label`` and both image-level classes occur; else a
    :class:`DataError` (a weakly supervised model must never see pixel labels, and needs positive and
    negative images to learn what a tumour looks like)."""
    leaked = [f"{i.get('case', '?')} slice {i.get('slice', '?')}" for i in items if "label" in i]
    if leaked:
        raise DataError([f"{context}: {len(leaked)} item(s) carry pixel labels (first: {leaked[0]}); expected "
                         "image-level labels only ('class')"])
    classes = {float(i["class"]) for i in items}
    missing = [name for value, name in ((1.0, "positive (tumour)"), (0.0, "negative (tumour-free)")) if value not in classes]
    if missing:
        raise DataError([f"{context}: {len(items)} slice(s) but no {' and no '.join(missing)} image-level label; "
                         "expected both classes (lower area_threshold, or add cases)"])
    return list(items)


def weak_slice_datalist(datalist: dict, area_threshold: int = 50, min_brain_fraction: float = 0.05) -> dict:
    """Slices of a case-level datalist: ``training`` with image-level labels only (checked by
    :func:`image_level_only`), ``validation`` and ``test`` with pixel labels for evaluation."""
    training = [{k: v for k, v in i.items() if k != "label"}
                for i in brats_axial_slices(datalist["training"], area_threshold, False, min_brain_fraction)]
    return {"training": image_level_only(training),
            **{k: brats_axial_slices(datalist.get(k, []), area_threshold, True, min_brain_fraction)
               for k in ("validation", "test")}}


def training_slices(datalist: dict, supervision: str = "image", area_threshold: int = 50,
                    min_brain_fraction: float = 0.05) -> list[dict]:
    """The training slices of a case-level datalist: image-level labels only (``supervision="image"``,
    checked by :func:`image_level_only`), or with pixel labels (``"pixel"``: the fully supervised
    upper bound, never a weakly supervised method). Image-level labels come from the labelled training
    cases (:func:`medssl.data.labelled`: derived from their segmentations) and, with ``"image"``, from every
    other training case that carries annotator slice ``tags`` (:mod:`medssl.data.tags`); cases with
    neither are skipped, none at all is a :class:`DataError`."""
    from .split import _is_labelled, labelled

    if supervision == "image":
        tagged = [c for c in datalist["training"] if not _is_labelled(c) and "tags" in c]
        segmented = labelled(datalist) if not tagged else [c for c in datalist["training"] if _is_labelled(c)]
        training = [{k: v for k, v in i.items() if k != "label"}
                    for i in brats_axial_slices(segmented, area_threshold, False, min_brain_fraction)]
        training += brats_axial_slices([{k: v for k, v in c.items() if k != "label"} for c in tagged],
                                       use_tags=True)
        return image_level_only(training)
    if supervision == "pixel":
        return brats_axial_slices(labelled(datalist), area_threshold, True, min_brain_fraction)
    raise ValueError(f"supervision must be 'image' or 'pixel', got {supervision!r}")
