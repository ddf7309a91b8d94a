"""Validation of a data set before anything trains on it.

Every problem is collected in one pass and reported together, each line naming the file and
what was expected, e.g. ``.../Case_t1ce.nii.gz: missing (expected modalities flair, t1, t1ce, t2
and seg)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .tags import read_tags
from .layouts import BRATS_LABEL_VALUES, BRATS_MODALITIES, EXPECTED_LAYOUT, LAYOUTS, detect_layout


class DataError(ValueError):
    """Bad input data; the message lists every problem found, one per line."""

    def __init__(self, problems: Sequence[str], context: str = ""):
        self.problems = list(problems)
        head = f"{context}: " if context else ""
        super().__init__(f"{head}{len(self.problems)} data problem(s):\n  " + "\n  ".join(self.problems))


@functools.lru_cache(maxsize=1)
def _loader():
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, ensure_channel_first=False)


def _load(path: str):
    """(array, affine) through MONAI's LoadImage; raises with the reader's message on a bad file."""
    img = _loader()(path)
    return np.asarray(img), np.asarray(img.affine)


def _read(path: str, problems: list[str], what: str):
    p = Path(path)
    if not p.exists():
        problems.append(f"{path}: missing ({what})")
        return None
    try:
        return _load(path)
    except Exception as e:  # any reader failure: truncated gzip, bad header, unknown format
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        problems.append(f"{path}: unreadable, truncated or corrupt ({what}); reader said: {msg[:200]}")
        return None


def check_brats_case(case: dict, modalities: Sequence[str] = BRATS_MODALITIES,
                     label_values: Iterable[int] = BRATS_LABEL_VALUES, atol: float = 1e-3) -> list[str]:
    """Problems of one BraTS case dict (``image`` = list of modality paths, optional ``label`` and slice
    ``tags``)."""
    problems: list[str] = []
    expected = f"expected modalities {', '.join(modalities)}" + (" and seg" if "label" in case else "")
    paths = list(case["image"]) + ([case["label"]] if "label" in case else [])
    names = list(modalities) + (["seg"] if "label" in case else [])
    loaded = {}
    for name, path in zip(names, paths):
        out = _read(path, problems, f"{expected}; this is {name}")
        if out is not None:
            loaded[name] = (path, *out)
    ref = next(iter(loaded.values()), None)
    if ref is None:
        return problems
    ref_path, ref_arr, ref_aff = ref
    for name, (path, arr, aff) in loaded.items():
        bad = int(np.count_nonzero(~np.isfinite(arr))) if np.issubdtype(arr.dtype, np.floating) else 0
        if bad:
            problems.append(f"{path}: {bad} non-finite voxel(s) (NaN or Inf); expected finite intensities")
        if arr.ndim != 3:
            problems.append(f"{path}: expected a 3D volume, found shape {tuple(arr.shape)}")
        elif arr.shape != ref_arr.shape:
            problems.append(f"{path}: shape {tuple(arr.shape)} differs from {Path(ref_path).name} "
                            f"{tuple(ref_arr.shape)}; expected all modalities and seg co-registered")
        elif not np.allclose(aff, ref_aff, atol=atol):
            sp, rsp = np.linalg.norm(aff[:3, :3], axis=0), np.linalg.norm(ref_aff[:3, :3], axis=0)
            problems.append(f"{path}: affine (spacing {np.round(sp, 3).tolist()}) differs from "
                            f"{Path(ref_path).name} (spacing {np.round(rsp, 3).tolist()}); expected the same grid")
    if "tags" in case and ref_arr.ndim == 3:
        problems += read_tags(case["tags"], ref_arr.shape, ref_aff)[1]
    if "seg" in loaded:
        path, arr, _ = loaded["seg"]
        allowed = set(int(v) for v in label_values)
        found = np.unique(arr)
        bad = sorted(float(v) for v in found if v not in allowed)
        if bad:
            bad_s = [int(v) if float(v).is_integer() else v for v in bad]
            problems.append(f"{path}: unknown label values {bad_s}; expected a subset of {sorted(allowed)}")
    return problems


def check_nuclei_case(case: dict) -> list[str]:
    """Problems of one DSB nuclei case: readable image, single-channel label map of the same size."""
    problems: list[str] = []
    img = _read(case["image"], problems, "expected an RGB, RGBA or greyscale PNG")
    lab = _read(case["label"], problems, "expected a single-channel instance map PNG") if "label" in case else None
    if lab is not None:
        arr = lab[0]
        if arr.ndim != 2:
            problems.append(f"{case['label']}: expected a single-channel label map, found shape {tuple(arr.shape)}")
        elif img is not None and img[0].shape[:2] != arr.shape:
            problems.append(f"{case['label']}: size {tuple(arr.shape)} differs from its image "
                            f"{tuple(img[0].shape[:2])}; expected the same height and width")
    return problems


def check_cases(cases: Sequence[dict], layout: str = "brats", context: str = "", **kwargs) -> None:
    """Raise :class:`DataError` listing every problem of ``cases`` (nothing when all are fine)."""
    if not cases:
        raise DataError([f"{context or 'datalist'}: no cases; expected at least one"], "")
    fn = check_brats_case if layout == "brats" else check_nuclei_case
    problems = [p for c in cases for p in fn(c, **kwargs)]
    if problems:
        raise DataError(problems, context)


def check_dataset_dir(dataset_dir: str | Path, layout: str | None = None) -> list[str]:
    """All problems of a data directory (an empty list when it is fine)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        return [f"{root}: not a directory; expected a data set folder"]
    layout = layout or detect_layout(root)
    cases = LAYOUTS[layout](root)
    if not cases:
        return [f"{root}: no cases found; expected {EXPECTED_LAYOUT[layout]}"]
    try:
        check_cases(cases, layout)
    except DataError as e:
        return e.problems
    return []
