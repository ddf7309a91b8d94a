"""MONAI Label integration: serve the bundles to 3D Slicer / OHIF through a MONAI Label server.

- :func:`prepare_studies` turns a data folder into the studies folder MONAI Label's local datastore reads
  (one image per study: a BraTS case's four modalities as one 4-channel NIfTI; labels under
  ``labels/final``), without touching the originals.
- :func:`materialise_bundle` writes one bundle as MONAI Label's ``BundleInferTask`` / ``BundleTrainTask``
  read it (``<model dir>/<name>/configs`` + ``models/model.pt``), with the settings a trained run recorded
  applied to ``inference.json`` so the served network matches its weights.
- :data:`SERVING` says what each bundle serves (the study kind, its label values, 2-D or 3-D).
- ``medssl/label/app/main.py`` is the app folder ``monailabel start_server --app`` loads; its class is
  :class:`medssl.label.tasks.MedsslApp` (imports monailabel, which this module does not need).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import PACKAGE_DIR

logger = logging.getLogger(__name__)

APP_DIR = PACKAGE_DIR / "label" / "app"
INSTALL_HINT = ('MONAI Label is not installed; install the label extra: pip install torch==2.14.1 torchvision==0.29.1 '
                '&& pip install "medssl[label]"  (from a checkout: pip install -e ".[label]")')
SERVED_FILE = "served.json"  # in the model dir: {bundle: {"served": bool, "reason", "weights", "kind"}}
BRATS_LABELS = {"necrotic and non-enhancing tumour core": 1, "peritumoural edema": 2, "enhancing tumour": 4}
WT_LABELS = {"whole tumour": 1}

# What each bundle serves, per study kind ("brats": 4-channel 3-D NIfTI studies; "nuclei": 2-D PNGs):
# the label values the written label map holds, its dimension, the channels its input must have
# (None: any, a PNG brought to the network's channels by the bundle's preprocessing), and the config
# settings that select that data variant of the bundle.
SERVING = {
    "context_restoration": {"brats": {"labels": BRATS_LABELS, "dimension": 3, "channels": (4,)}},
    "slem": {"brats": {"labels": BRATS_LABELS, "dimension": 3, "channels": (4,)}},
    # one network per modality; the 4-channel study's channel of `modality` (or a 1-channel volume) is read
    "semi_cml": {"brats": {"labels": WT_LABELS, "dimension": 3, "channels": (1, 4)}},
    # a 2-D network applied slice by slice to the volume (SliceInferer): served as a 3-D model
    "cluster_resupervision": {"brats": {"labels": WT_LABELS, "dimension": 3, "channels": (4,)}},
    "dfr_barlow": {"brats": {"labels": WT_LABELS, "dimension": 3, "channels": (4,),
                             "settings": {"dataset_name": "brats18_2mm"}},
                   "nuclei": {"labels": {"nucleus": 1}, "dimension": 2, "channels": None,
                              "settings": {"dataset_name": "dsb2018_nuclei"}}},
}
KIND_TEXT = {"brats": "a 3-D volume with the 4 BraTS modalities (flair, t1, t1ce, t2) as a 4-channel NIfTI",
             "nuclei": "a 2-D image (PNG)"}


def monailabel_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("monailabel") is not None


# ---------------------------------------------------------------------------------------------- studies
def studies_kind(folder: str | Path) -> str:
    """``"nuclei"`` when the folder holds 2-D pictures (``images/*.png`` or ``*.png`` at the top), else
    ``"brats"``."""
    root = Path(folder)
    if (root / "images").is_dir() or any(root.glob("*.png")):
        return "nuclei"
    return "brats"


def is_studies_folder(folder: str | Path) -> bool:
    """True for a plain MONAI Label studies folder: images directly inside (no BraTS case folders, no
    ``images/`` folder)."""
    root = Path(folder)
    return not (root / "images").is_dir() and any(
        p.is_file() and p.name.endswith((".nii.gz", ".nii", ".nrrd", ".png")) for p in root.iterdir())


def _newer(dst: Path, sources) -> bool:
    return dst.is_file() and all(dst.stat().st_mtime >= Path(s).stat().st_mtime for s in sources)


def _place(dst: Path, write) -> None:
    """``write(tmp)`` into a temporary folder beside ``dst`` (never a name the datastore would list), then
    rename it onto ``dst`` (atomic)."""
    tmp_dir = dst.parent / ".medssl_tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / dst.name
    try:
        write(tmp)
        tmp.replace(dst)
    finally:
        if tmp.exists():
            tmp.unlink()
        try:
            tmp_dir.rmdir()
        except OSError:
            pass


def _stack_case(paths: list[Path], out: Path) -> None:
    """The modalities of one case as one 4-D NIfTI (channel last, as nibabel writes one), with the first
    modality's affine and header."""
    import nibabel as nib
    import numpy as np

    from ..data import DataError

    arrays, first = [], None
    for p in paths:
        if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
            img = nib.load(str(p))
            arr = np.asanyarray(img.dataobj)
        else:  # .mha/.nrrd/DICOM series: MONAI's reader, its affine
            from monai.transforms import LoadImage

            t = LoadImage(image_only=True)(str(p))
            arr, img = np.asarray(t), nib.Nifti1Image(np.asarray(t), np.asarray(t.affine))
        if first is None:
            first = img
        elif arr.shape != arrays[0].shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise DataError([f"{p}: shape {arr.shape} / affine differ from {paths[0]} {arrays[0].shape}; "
                             f"expected the modalities of a case on one grid"])
        arrays.append(arr)
    header = first.header.copy()
    header.set_data_dtype(np.result_type(*arrays))
    stacked = np.stack(arrays, axis=-1)
    nib.save(nib.Nifti1Image(stacked, first.affine, header), str(out))


def prepare_studies(src: str | Path, dst: str | Path) -> dict:
    """Write MONAI Label's studies folder ``dst`` from the data folder ``src``; ``src`` is never written.

    - BraTS layout (``<case>/<case>_{flair,t1,t1ce,t2}[,_seg].nii.gz``): ``dst/<case>.nii.gz``, the four
      modalities in :data:`medssl.data.BRATS_MODALITIES` order as one 4-channel NIfTI (channel last; the
      flair's affine and header), and ``dst/labels/final/<case>.nii.gz`` (the seg, copied) where the case
      has one. A case missing a modality is skipped (reported).
    - nuclei layout (``images/<id>.png``, ``labels/<id>.png``): ``dst/<id>.png`` (copied) and
      ``dst/labels/final/<id>.png``, the foreground (label > 0) as 0/1 uint8.

    Idempotent: a study or label newer than its sources is kept as it is (so labels saved through the
    server are not overwritten unless the source label is newer). Returns ``{"studies": [...],
    "labels": [...], "skipped": {case: reason}}``.
    """
    from ..data import BRATS_MODALITIES, detect_layout
    from ..data.layouts import brats_case_dirs, find_modality

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder; expected a data folder (BraTS case folders or images/)")
    if dst == src or src in dst.parents:
        raise ValueError(f"{dst}: inside the data folder {src}; expected a separate studies folder")
    labels_dir = dst / "labels" / "final"
    labels_dir.mkdir(parents=True, exist_ok=True)
    report = {"studies": [], "labels": [], "skipped": {}}
    if detect_layout(src) == "nuclei":
        import numpy as np
        from PIL import Image

        for img in sorted((src / "images").glob("*.png")):
            out = dst / img.name
            if not _newer(out, [img]):
                _place(out, lambda t, img=img: shutil.copyfile(img, t))
            report["studies"].append(img.stem)
            lab = src / "labels" / img.name
            if lab.is_file():
                out = labels_dir / img.name
                if not _newer(out, [lab]):
                    mask = (np.asarray(Image.open(lab)) > 0).astype(np.uint8)
                    _place(out, lambda t, m=mask: Image.fromarray(m).save(t, format="PNG"))
                report["labels"].append(img.stem)
        return report
    for case_dir in brats_case_dirs(src):
        case = case_dir.name
        paths = [find_modality(case_dir, case, m) for m in BRATS_MODALITIES]
        missing = [m for m, p in zip(BRATS_MODALITIES, paths) if p is None]
        if missing:
            report["skipped"][case] = f"{case_dir}: no {', '.join(missing)}; expected <case>_<modality>.nii.gz"
            logger.warning("prepare_studies: skip %s", report["skipped"][case])
            continue
        out = dst / f"{case}.nii.gz"
        if not _newer(out, paths):
            _place(out, lambda t, paths=paths: _stack_case(paths, t))
        report["studies"].append(case)
        seg = find_modality(case_dir, case, "seg")
        if seg is not None and seg.is_file() and seg.name.endswith(".nii.gz"):
            out = labels_dir / f"{case}.nii.gz"
            if not _newer(out, [seg]):
                _place(out, lambda t, seg=seg: shutil.copyfile(seg, t))
            report["labels"].append(case)
    if not report["studies"]:
        raise ValueError(f"{src}: no study found; expected BraTS case folders <case>/<case>_<modality>.nii.gz or "
                         f"images/<id>.png")
    return report


# ---------------------------------------------------------------------------------------------- bundles
def parse_weights(weights) -> dict:
    """``"name=DIR,name2=DIR2"`` (or a dict / list of ``name=DIR``) -> ``{name: Path}``."""
    if not weights:
        return {}
    if isinstance(weights, dict):
        return {k: Path(v) for k, v in weights.items()}
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    out = {}
    for item in items:
        name, eq, path = str(item).partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ValueError(f"--weights {item!r}: expected name=RUN_DIR (a bundle name and a trained run's folder)")
        out[name.strip()] = Path(path.strip()).expanduser()
    return out


def parse_bundles(bundles) -> list[str]:
    """``"a,b"`` (or a list) -> the names, each checked to be a shipped bundle; empty: all of them."""
    from ..bundles import bundle_path, list_bundles

    if not bundles:
        return [b["name"] for b in list_bundles()]
    names = [n.strip() for n in (bundles.split(",") if isinstance(bundles, str) else bundles) if str(n).strip()]
    for n in names:
        bundle_path(n)  # raises naming the known bundles
    return names


def served_settings(name: str, kind: str, weights: Path | None) -> dict:
    """The inference.json settings of bundle ``name`` served on ``kind`` studies: the study kind's data
    variant, then those the run in ``weights`` was trained with (:func:`medssl.bundles.recorded_settings`).
    A run trained on another kind of data raises ``ValueError`` naming both."""
    spec = SERVING[name][kind]
    settings = dict(spec.get("settings", {}))
    if weights is not None and weights.is_dir():
        from ..bundles import recorded_settings
        from ..data import dataset_layout

        recorded = recorded_settings(name, "inference", weights)
        record = weights / "run.json"
        trained = json.loads(record.read_text()).get("settings", {}).get("dataset_name") if record.is_file() else None
        if trained and kind in ("brats", "nuclei") and dataset_layout(trained) != kind:
            raise ValueError(f"{weights}: trained on {trained!r} ({dataset_layout(trained)} images); the studies are "
                             f"{KIND_TEXT[kind]}, which it cannot segment")
        settings.update({k: v for k, v in recorded.items() if k != "dataset_name" or "dataset_name" not in settings})
    return settings


def weights_settings(name: str, models_dir: str | Path) -> dict:
    """The ``inference.json`` settings the weights served from ``models_dir`` need (network sizes and switches):
    those their run recorded (``models_dir/run.json``, copied there with the weights by ``serve --weights RUN``
    or published with them by a MONAI Label training), less the data variant the bundle is served for; those
    equal to the defaults too, so that applying them to a config that earlier weights' settings were applied
    to gives these weights' network. Empty without a record."""
    from ..bundles import recorded_settings

    return {k: v for k, v in recorded_settings(name, "inference", models_dir, changed_only=False).items()
            if k != "dataset_name"}


def materialise_bundle(name: str, dest: str | Path, kind: str = "brats", weights: Path | None = None) -> str | None:
    """Write bundle ``name`` into ``dest`` (``configs/``, ``docs/``, ``LICENSE``, ``models/model.pt``) as MONAI
    Label reads it, for studies of ``kind``. Weights: ``weights`` (a run folder or a model file; its
    ``run.json`` settings are applied to ``configs/inference.json``), else the bundle's own
    ``models/model.pt``, else a model already in ``dest/models``. Returns None when the bundle can be served,
    else the reason it cannot (and writes no weights)."""
    from ..bundles import bundle_path

    if kind not in SERVING.get(name, {}):
        kinds = " or ".join(KIND_TEXT[k] for k in SERVING.get(name, {}))
        return f"serves {kinds}; the studies are {KIND_TEXT[kind]}"
    src, dest = bundle_path(name), Path(dest)
    try:
        settings = served_settings(name, kind, weights)
    except ValueError as e:
        return str(e)
    for part in ("configs", "docs"):
        if (src / part).is_dir():
            if (dest / part).exists():
                shutil.rmtree(dest / part)
            shutil.copytree(src / part, dest / part)
    if (src / "LICENSE").is_file():
        shutil.copyfile(src / "LICENSE", dest / "LICENSE")
    from ..bundles import format_config, inference_weights, set_config_id

    config = json.loads((src / "configs" / "inference.json").read_text())
    for k, v in settings.items():
        set_config_id(config, k, v)

    (dest / "configs" / "inference.json").write_text(format_config(config) + "\n")
    model = dest / "models" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        source = Path(weights)
        try:
            shutil.copyfile(source if source.is_file() else inference_weights(source, config), model)
        except FileNotFoundError as e:
            return str(e)
        if name == "semi_cml" and source.is_dir():  # every modality network (active learning compares them)
            for extra in source.glob("model_*.pt"):
                shutil.copyfile(extra, model.parent / extra.name)
        record = source / "run.json"
        if record.is_file():  # the served weights' settings (weights_settings)
            shutil.copyfile(record, model.parent / "run.json")
        else:
            (model.parent / "run.json").unlink(missing_ok=True)
    elif (src / "models" / "model.pt").is_file():
        shutil.copyfile(src / "models" / "model.pt", model)
        (model.parent / "run.json").unlink(missing_ok=True)
    if not model.is_file():
        return (f"no weights: give --weights {name}=RUN_DIR (a trained run's folder holding model.pt), or put "
                f"them in {src / 'models' / 'model.pt'}")
    return None


def materialise_bundles(names, models_dir: str | Path, kind: str, weights: dict | None = None) -> dict:
    """:func:`materialise_bundle` for each of ``names`` under ``models_dir/<name>``; writes and returns the
    ``served.json`` record the app reads (``{name: {"served", "reason", "weights", "kind"}}``)."""
    from ..utils import atomic_write_json

    weights = weights or {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"--weights for {unknown}, which are not served; expected names among {list(names)}")
    record = {}
    for n in names:
        reason = materialise_bundle(n, Path(models_dir) / n, kind, weights.get(n))
        record[n] = {"served": reason is None, "reason": reason, "kind": kind,
                     "weights": str(weights[n]) if n in weights else None}
        if reason:
            logger.warning("MONAI Label: bundle %s not served: %s", n, reason)
    atomic_write_json(record, Path(models_dir) / SERVED_FILE)
    return record


# ---------------------------------------------------------------------------------------------- input check
def study_problem(path: str, name: str, kind: str, channels_of=None) -> str | None:
    """Why ``path`` cannot be segmented by bundle ``name`` served on ``kind`` studies, or None. Reads only the
    image header (NIfTI) or the picture's size (PNG); a DICOM folder or another format passes to the reader."""
    spec = SERVING[name][kind]
    p = Path(path)
    if not path or not p.exists():
        return f"image {path!r} does not exist; expected {KIND_TEXT[kind]}"
    low = p.name.lower()
    if low.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        if spec["dimension"] == 3:
            from PIL import Image

            with Image.open(p) as im:
                size = f"{im.size[0]} x {im.size[1]} {im.mode}"
            return f"image {p.name} is a 2-D picture ({size}); model {name} expects {KIND_TEXT[kind]}"
        return None
    if low.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            shape = tuple(int(s) for s in nib.load(str(p)).shape)
        except Exception as e:  # truncated or not a NIfTI
            return f"image {p.name} cannot be read as NIfTI ({e}); expected {KIND_TEXT[kind]}"
        if spec["dimension"] == 2:
            return f"image {p.name} is a NIfTI volume of shape {shape}; model {name} expects {KIND_TEXT[kind]}"
        channels = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
        allowed = spec["channels"]
        if channels is None or (allowed and channels not in allowed):
            want = " or ".join(str(c) for c in allowed)
            return (f"image {p.name} has shape {shape} ({channels if channels else '?'} channel(s)); model {name} "
                    f"expects {want} channel(s): {KIND_TEXT[kind]}"
                    + (" (or one modality)" if 1 in allowed else "")
                    + (" - a study missing modalities cannot be segmented" if channels and channels < 4 else ""))
    return None


# ---------------------------------------------------------------------------------------------- serve
def default_work_dir(src: Path) -> Path:
    """``~/.cache/medssl/label/<folder name>_<hash of its path>``: prepared studies and served bundles."""
    import hashlib

    digest = hashlib.sha1(str(Path(src).resolve()).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "medssl" / "label" / f"{Path(src).name}_{digest}"


def monailabel_command() -> list[str]:
    """MONAI Label's command run by the interpreter medssl runs in (``python -m monailabel.main``): its
    ``monailabel`` console script is a shell wrapper that calls whichever ``python`` is first on PATH, so a
    server started from a venv that is not activated (a service, a cron job) would die with "No module named
    'monailabel'"."""
    import sys

    return [sys.executable, "-m", "monailabel.main"]


def serve_command(studies: str | Path, bundles="", port: int = 8000, weights="", out: str | Path = "") -> list[str]:
    """Prepare the studies (a data folder in the BraTS or nuclei layout is written as a MONAI Label studies
    folder under ``out``; a studies folder is used as it is) and the served bundle folders (``out/model``),
    and return the ``monailabel start_server`` command that serves them on 127.0.0.1:``port``."""
    src = Path(studies).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder; expected a studies folder or a data folder")
    names, weights = parse_bundles(bundles), parse_weights(weights)
    work = Path(out).expanduser().resolve() if out else default_work_dir(src)
    if is_studies_folder(src):
        studies_dir = src
    else:
        studies_dir = work / "studies"
        report = prepare_studies(src, studies_dir)
        logger.info("prepared %d studies (%d labelled) from %s in %s", len(report["studies"]), len(report["labels"]),
                    src, studies_dir)
    kind = studies_kind(studies_dir)
    record = materialise_bundles(names, work / "model", kind, weights)
    if not any(r["served"] for r in record.values()):
        raise ValueError("no bundle can be served: " + "; ".join(f"{n}: {r['reason']}" for n, r in record.items()))
    # MONAI Label writes its logs (and caches) inside the app folder: serve a copy under ``work``, never the
    # package's own folder (read-only in an installed package)
    app = work / "app"
    app.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_DIR / "main.py", app / "main.py")
    return monailabel_command() + ["start_server", "--app", str(app), "--studies", str(studies_dir), "--host", "127.0.0.1",
                   "--port", str(int(port)), "--conf", "models_dir", str(work / "model"), "--conf", "bundles",
                   ",".join(names), "--conf", "kind", kind]
