"""Case discovery for the real data layouts.

BraTS: ``<dir>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``. Each modality may also be a
``.nii``/``.mha``/``.nrrd`` file or a DICOM series folder ``<case>/<case>_<modality>/``; all are
read through MONAI's ``LoadImage`` (nibabel, ITK or pydicom reader).

DSB 2018 nuclei: ``<dir>/images/<id>.png`` (RGB/RGBA/grey) and ``<dir>/labels/<id>.png`` (uint16
instance map, 0 = background).

A case without its segmentation (no ``<case>_seg`` file; no ``labels/<id>.png``) is an *unlabelled* case:
its dict has no ``label`` key. Splits put such cases in ``training`` only, as ``"labelled": false``
(:func:`medssl.data.make_split`); pretraining and the unlabelled stream of semi-supervised training use
them, supervised training and evaluation do not.
"""

from __future__ import annotations

from pathlib import Path

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_LABEL_VALUES = (0, 1, 2, 4)
BRATS_REGIONS = ("TC", "WT", "ET")  # channel order of ConvertToMultiChannelBasedOnBratsClasses
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def modality_channel(modality: str, modalities=BRATS_MODALITIES) -> int:
    """The channel index of ``modality`` in an image stacked in the order of ``modalities`` (BraTS:
    flair, t1, t1ce, t2), e.g. the reconstruction target of a bundle's ``target_modality``; an unknown
    name raises :func:`medssl.utils.check_choice`'s error naming the config id ``target_modality``."""
    from medssl.utils import check_choice

    return list(modalities).index(check_choice("target_modality", modality, modalities))


def find_modality(case_dir: Path, case: str, name: str) -> Path | None:
    """The file (or DICOM series folder) of modality ``name`` of ``case``, or None when absent."""
    for suffix in IMAGE_SUFFIXES:
        p = case_dir / f"{case}_{name}{suffix}"
        if p.is_file():
            return p
    d = case_dir / f"{case}_{name}"
    if d.is_dir() and any(d.iterdir()):
        return d
    return None


def expected_modality_path(case_dir: Path, case: str, name: str) -> Path:
    return case_dir / f"{case}_{name}.nii.gz"


def brats_case_dirs(dataset_dir: str | Path) -> list[Path]:
    """Sub-folders of ``dataset_dir`` that look like BraTS cases (hold at least one ``<case>_*`` entry)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob(f"{d.name}_*")))


def brats_cases(dataset_dir: str | Path, modalities=BRATS_MODALITIES, with_label: bool = True) -> list[dict]:
    """One dict per case: ``{"case", "image": [modality paths], "label": seg path}``, without ``label``
    for a case that has no seg file (an unlabelled case) or when ``with_label`` is false; plus ``"tags"``,
    the path of ``<case>_tags.json`` where the case has image-level slice tags (:mod:`medssl.data.tags`).

    Absolute paths; a missing modality is reported under its expected name so that
    :func:`medssl.data.check_cases` can name it.
    """
    cases = []
    for d in brats_case_dirs(dataset_dir):
        paths = [find_modality(d, d.name, m) or expected_modality_path(d, d.name, m) for m in modalities]
        item = {"case": d.name, "image": [str(p) for p in paths]}
        seg = find_modality(d, d.name, "seg") if with_label else None
        if seg is not None:
            item["label"] = str(seg)
        if with_label and (d / f"{d.name}_tags.json").is_file():  # annotator slice tags (medssl.data.tags)
            item["tags"] = str(d / f"{d.name}_tags.json")
        cases.append(item)
    return cases


def nuclei_cases(dataset_dir: str | Path) -> list[dict]:
    """One dict per image of the DSB 2018 nuclei layout: ``{"case", "image", "label"}``, without ``label``
    for an image that has no ``labels/<id>.png`` (an unlabelled case)."""
    root = Path(dataset_dir)
    images = sorted((root / "images").glob("*.png")) if (root / "images").is_dir() else []
    labels = root / "labels"
    return [{"case": p.stem, "image": str(p), **({"label": str(labels / p.name)} if (labels / p.name).is_file() else {})}
            for p in images]


LAYOUTS = {"brats": brats_cases, "nuclei": nuclei_cases}
EXPECTED_LAYOUT = {"brats": "BraTS case folders <case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz",
                   "nuclei": "images/<id>.png with labels/<id>.png"}
EXPECTED_LABEL = {"brats": "a segmentation <case>/<case>_seg.nii.gz",
                  "nuclei": "a label map labels/<id>.png"}


def dataset_layout(dataset_name: str) -> str:
    """The layout (a key of :data:`LAYOUTS`) a 2D bundle reads for the data set called ``dataset_name``:
    ``"brats"`` (4-modality NIfTI volumes, used slice by slice) for a name starting with ``brats``,
    else ``"nuclei"`` (PNG images). Bundle configs switch their data variants on it with
    :func:`medssl.utils.choose`."""
    return "brats" if str(dataset_name).startswith("brats") else "nuclei"


def detect_layout(dataset_dir: str | Path) -> str:
    """``"nuclei"`` when ``dataset_dir/images`` exists, else ``"brats"``."""
    return "nuclei" if (Path(dataset_dir) / "images").is_dir() else "brats"
