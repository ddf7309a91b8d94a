"""Image-level tags of a BraTS study: which axial slices show a tumour, for weakly supervised training.

cluster_resupervision learns from "tumour present" labels of axial slices. They are derived from a
segmentation where a case has one (:func:`medssl.data.brats_axial_slices`); a study that nobody has
segmented can instead carry tags an annotator gave, in ``<case>/<case>_tags.json``::

    {"tumour_slices": [38, 39, 40], "tumour_free_slices": [10, 11, 60]}

Indices are voxel indices ``k`` along the third axis of the study's own files (the slice number a viewer
shows for an axial series), which must be the head-foot axis. Only tagged slices train, and only for a
case whose segmentation is not in use (an unlabelled training case): a segmented case's labels come from
its segmentation. ``medssl label
serve`` writes this file from the study's MONAI Label image info (the same two keys, set with
``PUT /datastore/image/info``). :func:`tag_problems` validates a file against its study before anything
trains; :func:`axial_tags` maps the tags onto the slices of the RAS-oriented volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TAG_KEYS = {"tumour_slices": 1.0, "tumour_free_slices": 0.0}
EXPECTED_TAGS = ('a JSON object {"tumour_slices": [k, ...], "tumour_free_slices": [k, ...]} of axial slice '
                 "indices (the study's third voxel axis)")


def tags_file(case_dir: Path, case: str) -> Path:
    return case_dir / f"{case}_tags.json"


def _axial_axis(affine: np.ndarray) -> tuple[int, bool]:
    """(the file axis that runs head-foot, whether RAS orientation reverses it)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, bool(ornt[axis, 1] < 0)


def read_tags(path: str | Path, shape, affine) -> tuple[dict[int, float], list[str]]:
    """(``{k: 1.0 | 0.0}`` by file slice index, problems) of the tags file ``path`` for a study of voxel
    ``shape`` (3-D) and ``affine``. Problems name the file and what was expected; with any, the dict is empty."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, [f"{path}: missing; expected {EXPECTED_TAGS}"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, [f"{path}: not valid JSON ({e}); expected {EXPECTED_TAGS}"]
    if not isinstance(raw, dict) or not raw or set(raw) - set(TAG_KEYS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        return {}, [f"{path}: found {found}; expected {EXPECTED_TAGS}"]
    depth = int(shape[2])
    problems, tags = [], {}
    for key, value in ((k, v) for k, v in TAG_KEYS.items() if k in raw):
        ks = raw[key]
        if not isinstance(ks, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            problems.append(f"{path}: {key} is {json.dumps(ks)[:60]}; expected a list of integer slice indices")
            continue
        outside = [k for k in ks if not 0 <= k < depth]
        if outside:
            problems.append(f"{path}: {key} {outside[:5]} outside the study's {depth} axial slices; expected "
                            f"indices 0..{depth - 1}")
        both = sorted(k for k in ks if tags.get(k, value) != value)
        if both:
            problems.append(f"{path}: slices {both[:5]} are tagged both tumour and tumour-free; expected one tag each")
        tags.update({k: value for k in ks})
    if not tags and not problems:
        problems.append(f"{path}: no slice tagged; expected {EXPECTED_TAGS}")
    if _axial_axis(affine)[0] != 2:
        problems.append(f"{path}: its study's third voxel axis is not head-foot (orientation "
                        f"{''.join(_codes(affine))}); expected tags of axial slices along the third axis")
    return ({} if problems else tags), problems


def _codes(affine) -> tuple[str, ...]:
    import nibabel as nib

    return nib.aff2axcodes(np.asarray(affine, dtype=float))


def axial_tags(path: str | Path, shape, affine) -> dict[int, float]:
    """The tags of ``path`` keyed by the slice index of the RAS-oriented volume (what
    :func:`medssl.data.brats_axial_slices` iterates); a :class:`medssl.data.DataError` on a bad file."""
    from .check import DataError

    tags, problems = read_tags(path, shape, affine)
    if problems:
        raise DataError(problems)
    flipped = _axial_axis(affine)[1]
    depth = int(shape[2])
    return {(depth - 1 - k if flipped else k): v for k, v in tags.items()}
