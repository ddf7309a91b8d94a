"""Test set-up: real data from ../shared/data (MEDSSL_DATA_DIR), helpers to damage copies of real cases."""

import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from medssl.utils import data_root

REPO = Path(__file__).resolve().parents[1]
DATA = data_root()  # $MEDSSL_DATA_DIR, else ../shared/data beside this checkout
os.environ.setdefault("MEDSSL_DATA_DIR", str(DATA))
BRATS = DATA / "brats18_2mm"
NUCLEI = DATA / "dsb2018_nuclei"


def pytest_sessionstart(session):
    """No data, no tests: one line at the start instead of a failure per test."""
    missing = [p for p in (BRATS, NUCLEI) if not p.is_dir()]
    if missing:
        pytest.exit(f"the tests need the real data sets {', '.join(p.name for p in missing)} under {DATA} "
                    f"(looked in $MEDSSL_DATA_DIR, else ../shared/data beside this checkout); put ../shared beside "
                    f"the checkout or set MEDSSL_DATA_DIR (`medssl data download` fetches the BraTS sample)",
                    returncode=4)


@pytest.fixture(scope="session")
def brats_dir() -> Path:
    if not BRATS.is_dir():
        pytest.fail(f"{BRATS}: the real BraTS sample is required (set MEDSSL_DATA_DIR)")
    return BRATS


@pytest.fixture(scope="session")
def nuclei_dir() -> Path:
    if not NUCLEI.is_dir():
        pytest.fail(f"{NUCLEI}: the real DSB nuclei set is required (set MEDSSL_DATA_DIR)")
    return NUCLEI


@pytest.fixture
def brats_copy(tmp_path, brats_dir):
    """A writable copy of the first ``n`` real BraTS cases (a function: ``brats_copy(n) -> dir``)."""

    def make(n: int = 3) -> Path:
        out = tmp_path / "brats"
        for case in sorted(p for p in brats_dir.iterdir() if p.is_dir())[:n]:
            shutil.copytree(case, out / case.name)
        return out

    return make


@pytest.fixture
def nuclei_copy(tmp_path, nuclei_dir):
    """A writable copy of the first ``n`` real DSB images with their masks (``nuclei_copy(n) -> dir``)."""

    def make(n: int = 3) -> Path:
        root = tmp_path / "nuclei"
        for sub in ("images", "labels"):
            (root / sub).mkdir(parents=True)
        for p in sorted((nuclei_dir / "images").glob("*.png"))[:n]:
            for sub in ("images", "labels"):
                shutil.copy(nuclei_dir / sub / p.name, root / sub / p.name)
        return root

    return make


def monai_run(configs: Path, stage: str, *args, check: bool = True):
    """``python -m monai.bundle run --config_file "['configs/train.json','configs/<stage>.json']" ARGS`` run
    from the bundle folder, as the model zoo documents it (overlay stages layered over train.json as
    :func:`medssl.contract.stage_files` says; standalone stages alone)."""
    import subprocess
    import sys

    r = subprocess.run(monai_command(stage, *args), cwd=configs.parent, capture_output=True, text=True,
                       env=dict(os.environ))
    if check:
        assert r.returncode == 0, f"{stage} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def monai_command(stage: str, *args) -> list[str]:
    """The command line of :func:`monai_run` (run it from the bundle folder)."""
    import sys

    from medssl.contract import stage_files

    files = stage_files(stage)
    config_arg = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, *map(str, args)]


def check_killed_run_resumes_exactly(configs: Path, stage: str, args, tmp_path: Path, checkpoint: str,
                                     whole: Path | None = None) -> None:
    """Run ``stage`` with ``args`` uninterrupted into one folder (or take ``whole``, a finished run of the same
    ``args``); run it again into another, SIGKILL it once its first epoch's checkpoint is written (mid-run), and
    run it once more there, which resumes. The resumed run must end with exactly the uninterrupted one's
    weights, losses and validation curve."""
    import json
    import subprocess
    import time

    import torch

    def epoch(path):
        trainer = torch.load(path, weights_only=False)["trainer"]
        return trainer["iteration"] // trainer["epoch_length"]

    cut = tmp_path / "cut"
    if whole is None:
        whole = tmp_path / "whole"
        monai_run(configs, stage, *args, "--ckpt_dir", whole)
    proc = subprocess.Popen(monai_command(stage, *args, "--ckpt_dir", cut), cwd=configs.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        while proc.poll() is None:
            ckpt = cut / checkpoint
            if ckpt.is_file() and epoch(ckpt) >= 1:
                proc.kill()
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    killed_at = epoch(cut / checkpoint)
    r = monai_run(configs, stage, *args, "--ckpt_dir", cut)
    assert "resumed from" in r.stdout + r.stderr
    a, b = (torch.load(d / checkpoint, weights_only=False) for d in (whole, cut))
    assert a["trainer"] == b["trainer"] and epoch(cut / checkpoint) > killed_at, "the run was not cut off mid-way"
    net_a, net_b = a.get("network") or a["network_def"], b.get("network") or b["network_def"]
    assert net_a.keys() == net_b.keys() and all(torch.equal(net_a[k], net_b[k]) for k in net_a)
    curve_a, curve_b = (json.loads((d / "train_curve.json").read_text()) for d in (whole, cut))
    assert curve_a == curve_b


def check_metadata_and_export(bundle: Path, model_pt: Path, reference, x, tmp_path: Path, overrides=()) -> None:
    """MONAI's tools on a bundle: ``verify_metadata`` against the shipped schema, ``verify_net_in_out``,
    and ``ckpt_export`` of ``model_pt`` to TorchScript, whose output must equal ``reference`` (an eager
    network of the same architecture) loaded with the same weights, on input ``x``. ``overrides``
    (``--id value`` arguments) go to the two tools that build the network."""
    import subprocess
    import sys

    import torch

    from medssl import SCHEMA_FILE

    def tool(*args, cwd=bundle):
        r = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout + r.stderr

    assert "verified with no error" in tool("verify_metadata", "--meta_file", "configs/metadata.json",
                                            "--filepath", SCHEMA_FILE)
    assert "verified with no error" in tool("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                                            "--config_file", "configs/inference.json", "--n", "4", "--device", "cpu",
                                            *overrides)
    ts = tmp_path / "model.ts"
    tool("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", model_pt, "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.json", *overrides)
    reference.load_state_dict(torch.load(model_pt))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


TINY = ["--max_epochs", "1", "--epoch_length", "2"]  # a stage's wiring, not its numbers


def bundle_runner(name: str):
    """``(bundle_dir, configs_dir, run)`` for the bundle ``name``; ``run(stage, *args, check=True)``."""
    bundle = REPO / "bundles" / name

    def run(stage: str, *args, check: bool = True):
        return monai_run(bundle / "configs", stage, *args, check=check)

    return bundle, bundle / "configs", run


def case_file(root: Path, modality: str, index: int = 0) -> Path:
    case = sorted(p for p in root.iterdir() if p.is_dir())[index]
    return case / f"{case.name}_{modality}.nii.gz"


def nifti_to_dicom_series(src: Path, out: Path) -> Path:
    """Write a real NIfTI volume as an MR DICOM series (one file per slice, LPS geometry kept)."""
    import itk
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = itk.imread(str(src), itk.SS)  # ITK works in LPS physical space, as DICOM does
    arr = itk.array_view_from_image(img)  # (z, y, x)
    spacing, direction = list(itk.spacing(img)), np.asarray(img.GetDirection())
    out.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", "medssl-test", k + 1
        ds.ImagePositionPatient = [float(v) for v in img.TransformIndexToPhysicalPoint([0, 0, k])]
        ds.ImageOrientationPatient = [float(v) for v in list(direction[:, 0]) + list(direction[:, 1])]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(arr[k]).astype("<i2").tobytes()
        ds.save_as(out / f"IM{k:04d}.dcm", enforce_file_format=True)
    return out


# --- ways to damage a copy of real cases: each returns (damaged file, expected words in the message) ---

def _rewrite(path: Path, edit):
    import nibabel as nib
    import numpy as np

    img = nib.load(path)
    arr, affine = edit(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(arr, affine), path)


def damage_missing_t1ce(root):
    f = case_file(root, "t1ce")
    f.unlink()
    return f, "missing (expected modalities flair, t1, t1ce, t2 and seg"


def damage_shape(root):
    f = case_file(root, "t2")
    _rewrite(f, lambda a, aff: (a[:-3], aff))
    return f, "differs from"


def damage_spacing(root):
    f = case_file(root, "t1")

    def edit(a, aff):
        aff[:3, :3] *= 1.5
        return a, aff

    _rewrite(f, edit)
    return f, "spacing"


def damage_label(root):
    f = case_file(root, "seg")

    def edit(a, aff):
        a[a == 1] = 3
        return a, aff

    _rewrite(f, edit)
    return f, "unknown label values [3]; expected a subset of [0, 1, 2, 4]"


def damage_truncate(root):
    f = case_file(root, "flair", 1)
    f.write_bytes(f.read_bytes()[:5000])
    return f, "truncated or corrupt"


def damage_nan(root):
    import numpy as np

    f = case_file(root, "t1ce", 1)

    def edit(a, aff):
        a = a.astype("float32")
        a[a.shape[0] // 2, a.shape[1] // 2, : a.shape[2] // 2] = np.nan
        return a, aff

    _rewrite(f, edit)
    return f, "non-finite voxel(s) (NaN or Inf); expected finite intensities"


DAMAGES = [damage_missing_t1ce, damage_shape, damage_spacing, damage_label, damage_truncate, damage_nan]


CliResult = namedtuple("CliResult", "returncode stdout stderr")


@pytest.fixture
def medssl(capsys, monkeypatch):
    """``medssl ARGS`` run in this process: ``CliResult(returncode, stdout, stderr)`` (also unpackable)."""
    from medssl.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return call
