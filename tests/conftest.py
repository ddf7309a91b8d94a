"""Test set-up: real data from ../shared/data (MEDSSL_DATA_DIR), helpers to damage copies of real cases."""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDSSL_DATA_DIR", str((REPO / ".." / "shared" / "data").resolve()))
DATA = Path(os.environ["MEDSSL_DATA_DIR"])
BRATS = DATA / "brats18_2mm"
NUCLEI = DATA / "dsb2018_nuclei"


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


def case_file(root: Path, modality: str, index: int = 0) -> Path:
    case = sorted(p for p in root.iterdir() if p.is_dir())[index]
    return case / f"{case.name}_{modality}.nii.gz"
