"""A MONAI Label datastore seen as a data set in a bundle's own layout, unlabelled studies included.

MONAI Label's datastore holds one image per study (a 4-channel NIfTI for a BraTS study, as
``medssl label serve`` writes them; a PNG for a nuclei image) and, for the studies annotated so far, a
``final`` label. medssl's stages read BraTS case folders or the nuclei ``images/``+``labels/`` layout, with
cases that have no label being *unlabelled* cases (pretraining and the semi-supervised unlabelled stream
use them). :func:`write_view` writes that layout from the datastore, so a training requested through MONAI
Label runs the bundle's own stage - its data checks, its label fraction and validation split, its
unlabelled stream - on every study. No MONAI Label import: the datastore is passed in.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data import BRATS_MODALITIES, DataError
from ..data.tags import TAG_KEYS, tags_file
from ..utils import atomic_write, atomic_write_json

FINAL = "final"  # MONAI Label's tag of a submitted label


def study_layout(image_uri: str) -> str:
    """``"nuclei"`` for a 2-D PNG study, ``"brats"`` for a (4-channel) volume."""
    return "nuclei" if str(image_uri).lower().endswith(".png") else "brats"


def _newer(src: Path, dst: Path) -> bool:
    return not dst.is_file() or src.stat().st_mtime > dst.stat().st_mtime


def _save_nifti(array: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    img = nib.Nifti1Image(array, like.affine, like.header)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(gzip.compress(img.to_bytes(), compresslevel=1)))


def _brats_tags(info: dict, case_dir: Path) -> bool:
    """Write the study's image-level slice tags (its MONAI Label image info ``tumour_slices`` /
    ``tumour_free_slices``, :mod:`medssl.data.tags`) as ``<case>_tags.json``, or remove a stale one;
    whether the study has tags."""
    path = tags_file(case_dir, case_dir.name)
    tags = {k: info[k] for k in TAG_KEYS if info.get(k)}
    if not tags:
        path.unlink(missing_ok=True)
    elif not path.is_file() or json.loads(path.read_text()) != tags:
        atomic_write_json(tags, path)
    return bool(tags)


def _brats_case(image: Path, label: Path | None, case_dir: Path) -> None:
    case = case_dir.name
    targets = [case_dir / f"{case}_{m}.nii.gz" for m in BRATS_MODALITIES]
    if any(_newer(image, t) for t in targets):
        img = nib.load(str(image))
        if img.ndim != 4 or img.shape[-1] != len(BRATS_MODALITIES):
            raise DataError([f"{image}: shape {img.shape}; expected a {len(BRATS_MODALITIES)}-channel BraTS study "
                             f"(H, W, D, 4: {', '.join(BRATS_MODALITIES)}), as `medssl label serve` writes them"])
        data = np.asarray(img.dataobj)
        case_dir.mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(targets):
            _save_nifti(np.ascontiguousarray(data[..., k]), img, t)
    seg = case_dir / f"{case}_seg.nii.gz"
    if label is None:
        seg.unlink(missing_ok=True)
    elif _newer(label, seg):
        shutil.copyfile(label, seg)
        os.utime(seg)


def _nuclei_case(image: Path, label: Path | None, root: Path, case: str) -> None:
    for src, dst in ((image, root / "images" / f"{case}.png"), (label, root / "labels" / f"{case}.png")):
        if src is None:
            dst.unlink(missing_ok=True)
        elif _newer(src, dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def write_view(datastore, dst: str | Path) -> dict:
    """Write (or bring up to date) ``dst`` as the datastore's studies in their bundle layout: BraTS case
    folders ``<id>/<id>_{flair,t1,t1ce,t2}.nii.gz`` split from each 4-channel study (affine and header
    kept) plus ``<id>_seg.nii.gz`` where the study has a final label and ``<id>_tags.json`` where its image
    info holds image-level slice tags (:mod:`medssl.data.tags`); or ``images/<id>.png`` and
    ``labels/<id>.png``. Only what changed is rewritten; studies no longer in the datastore are removed.
    Returns ``{"layout", "labelled", "unlabelled", "tagged"}`` (study ids; ``tagged``: unlabelled studies
    with tags, which weakly supervised training uses)."""
    dst = Path(dst)
    ids = sorted(datastore.list_images())
    if not ids:
        raise DataError([f"{dst}: the datastore holds no study; expected images to train on"])
    layouts = {study_layout(datastore.get_image_uri(i)) for i in ids}
    if len(layouts) > 1:
        raise DataError([f"datastore mixes 2-D PNG and 3-D studies; expected one kind for one bundle"])
    layout = layouts.pop()
    labelled = set(datastore.get_labeled_images(FINAL))
    tagged = set()
    for i in ids:
        label = Path(datastore.get_label_uri(i, FINAL)) if i in labelled else None
        image = Path(datastore.get_image_uri(i))
        if layout == "brats":
            _brats_case(image, label, dst / i)
            if _brats_tags(datastore.get_image_info(i) or {}, dst / i):
                tagged.add(i)
        else:
            _nuclei_case(image, label, dst, i)
    kept = set(ids)
    stale = [p for p in (dst.iterdir() if layout == "brats" else (dst / "images").glob("*.png")) if
             (p.name if layout == "brats" else p.stem) not in kept and p.name not in ("images", "labels")]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        if layout == "nuclei":
            (dst / "labels" / p.name).unlink(missing_ok=True)
    return {"layout": layout, "labelled": sorted(kept & labelled), "unlabelled": sorted(kept - labelled),
            "tagged": sorted(tagged - labelled)}
