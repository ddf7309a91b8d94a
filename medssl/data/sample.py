"""The public BraTS 2018 sample: download the 1 mm originals and prepare the 2 mm copy.

``download`` fetches the 20 sample cases (100 NIfTI files) published in the public repository
koriavinash1/DeepBrainSeg at a fixed commit and refuses any file whose SHA-256 differs from
``brats18_sources.sha256`` (shipped with the package). ``prepare`` crops each case to the brain
bounding box (+2 voxels) and resamples it to 2 mm with MONAI transforms, images trilinear and
rounded to int16, segmentation nearest-neighbour: the recipe of ``brats18_2mm``.
"""

from __future__ import annotations

import gzip
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..utils import atomic_write, file_hash
from .layouts import BRATS_MODALITIES, brats_case_dirs, find_modality

logger = logging.getLogger(__name__)

SOURCES_FILE = Path(__file__).with_name("brats18_sources.sha256")
SOURCE_REPO = "koriavinash1/DeepBrainSeg"
SOURCE_COMMIT = "5d4f3810f1c776050b6937b6db5b7afa17527efd"
# a mirror of the same files (checked against the same SHA-256) can be named in $MEDSSL_BRATS_SOURCE_URL
SOURCE_URL = os.environ.get("MEDSSL_BRATS_SOURCE_URL") or \
    f"https://raw.githubusercontent.com/{SOURCE_REPO}/{SOURCE_COMMIT}/"


class DownloadError(RuntimeError):
    pass


def sources() -> list[tuple[str, str]]:
    """(sha256, path inside the source repository) of every original file."""
    rows = [line.split() for line in SOURCES_FILE.read_text().splitlines() if line.strip()]
    return [(h, p) for h, p in rows]


def download(out_dir: str | Path, timeout: float = 30.0) -> Path:
    """Download the 1 mm originals to ``out_dir/<case>/<file>``; verified files are kept, so it resumes."""
    out = Path(out_dir)
    for sha, rel in sources():
        dest = out / Path(rel).parent.name / Path(rel).name
        if dest.exists() and file_hash(dest) == sha:
            continue
        url = SOURCE_URL + rel
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                payload = r.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DownloadError(
                f"cannot download {url}: {getattr(e, 'reason', e)}. This machine seems to have no internet "
                f"access; fetch {SOURCE_REPO}@{SOURCE_COMMIT[:8]}/sample_volume/brats elsewhere and put the "
                f"case folders under {out}") from None

        def write(tmp, payload=payload):
            Path(tmp).write_bytes(payload)
            got = file_hash(Path(tmp))
            if got != sha:
                raise DownloadError(f"{url}: SHA-256 {got} does not match the expected {sha}; refused")

        atomic_write(dest, write)
        logger.info("downloaded %s", dest)
    return out


def prepare_case(case_dir: Path, out_dir: Path, pixdim: float = 2.0, margin: int = 2) -> Path:
    """Crop one 1 mm case to the brain (+``margin`` voxels) and resample it to ``pixdim`` mm."""
    import nibabel as nib
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Spacingd)

    case = case_dir.name
    names = [*BRATS_MODALITIES, "seg"]
    files = {n: find_modality(case_dir, case, n) for n in names}
    missing = [n for n, p in files.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{case_dir}: missing {missing}; expected {case}_<modality>.nii.gz for {names}")
    keys = names
    xf = Compose([
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        CropForegroundd(keys, source_key="flair", select_fn=lambda x: x > 0, margin=margin, allow_smaller=True),
        Spacingd(keys, pixdim=(pixdim,) * 3, mode=["bilinear"] * len(BRATS_MODALITIES) + ["nearest"]),
    ])
    d = xf({n: str(p) for n, p in files.items()})
    target = out_dir / case
    for n in names:
        arr = np.rint(np.asarray(d[n][0])).astype(np.int16)
        affine = np.asarray(d[n].affine, dtype=np.float64)
        img = nib.Nifti1Image(arr, affine)
        img.header.set_zooms((pixdim,) * 3)
        payload = gzip.compress(img.to_bytes())
        atomic_write(target / f"{case}_{n}.nii.gz", lambda tmp, payload=payload: Path(tmp).write_bytes(payload))
    return target


def prepare(src_dir: str | Path, out_dir: str | Path, pixdim: float = 2.0, margin: int = 2) -> list[Path]:
    """Prepare every case folder of ``src_dir`` into ``out_dir`` (cases already there are skipped)."""
    src, out = Path(src_dir), Path(out_dir)
    done = []
    for case_dir in brats_case_dirs(src):
        if all((out / case_dir.name / f"{case_dir.name}_{n}.nii.gz").exists() for n in [*BRATS_MODALITIES, "seg"]):
            done.append(out / case_dir.name)
            continue
        done.append(prepare_case(case_dir, out, pixdim, margin))
        logger.info("prepared %s", done[-1])
    if not done:
        raise FileNotFoundError(f"{src}: no BraTS case folders; expected <case>/<case>_<modality>.nii.gz")
    return done


def ensure_sample(data_dir: str | Path, name: str = "brats18_2mm") -> Path:
    """``data_dir/name``, downloading and preparing the public sample first when it is absent."""
    target = Path(data_dir) / name
    if brats_case_dirs(target):
        return target
    raw = Path(data_dir) / "brats18_1mm"
    download(raw)
    prepare(raw, target)
    return target
