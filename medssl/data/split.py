"""MSD-style datalists: seeded train/validation/test splits with a labelled fraction.

The JSON has the keys ``training``, ``validation`` and ``test`` (Medical Segmentation Decathlon
style, paths relative to the data set folder) and, inside ``training``, ``"labelled": true|false``
per case. For a given seed the three sets do not depend on the label fraction, and the labelled
cases are nested: the labelled cases at fraction 0.1 are among those at 0.2, and so on. With label unit
``"slice"`` (:func:`medssl.data.label_slices`, 2D networks on slices of BraTS volumes) a training volume may
instead carry ``"labelled_slices"``: only those axial slices' labels are in the budget.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..utils import atomic_write_json
from .check import DataError, check_cases
from .layouts import EXPECTED_LABEL, EXPECTED_LAYOUT, LAYOUTS, detect_layout

logger = logging.getLogger(__name__)


def _map_paths(item: dict, fn) -> dict:
    """``item`` with ``fn`` applied to every path of its ``image`` (a path or a list), ``label`` and ``tags``."""

    def apply(p):
        return [apply(q) for q in p] if isinstance(p, list) else fn(p)

    return {k: apply(v) if k in ("image", "label", "tags") else v for k, v in item.items()}


def _by_label(cases: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(cases with a ``label``, cases without), each sorted by case name."""
    cases = sorted(cases, key=lambda c: c["case"])
    return [c for c in cases if "label" in c], [c for c in cases if "label" not in c]


def make_split(cases: Sequence[dict], label_fraction: float = 1.0, seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.3) -> dict:
    """Split ``cases`` into training/validation/test and flag ``labelled`` training cases.

    Of the ``n`` cases that have a ``label`` (a segmentation file), ``round(test_fraction * n)`` go to
    test, ``round(val_fraction * n)`` to validation and the rest to training;
    ``max(1, round(label_fraction * n_training))`` of those training cases are labelled. Cases without a
    ``label`` (unlabelled scans) all go to ``training`` as ``"labelled": false``: pretraining and
    semi-supervised training use them, evaluation never does. ``test_fraction=1.0`` puts every labelled
    case in ``test`` (to evaluate a trained bundle on a folder it has never seen).
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if not (0.0 <= val_fraction <= 1.0 and 0.0 <= test_fraction <= 1.0 and val_fraction + test_fraction <= 1.0):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1] with a sum <= 1, "
                         f"got {val_fraction} and {test_fraction}")
    cases, without = _by_label(cases)
    n = len(cases)
    if n == 0 and not without:
        raise DataError(["no cases to split; expected at least one"])
    rng = np.random.RandomState(seed)
    order = [cases[i] for i in rng.permutation(n)]
    n_test = int(round(test_fraction * n))
    n_val = min(int(round(val_fraction * n)), n - n_test)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if n_test < n and not train:
        raise ValueError(f"{n} cases leave no training case with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    n_lab = max(1, int(round(label_fraction * len(train)))) if train else 0
    labelled = {c["case"] for c in [train[i] for i in rng.permutation(len(train))][:n_lab]}
    return {
        "seed": seed,
        "label_fraction": label_fraction,
        "training": [dict(c, labelled=c["case"] in labelled) for c in train] + [dict(c, labelled=False) for c in without],
        "validation": list(val),
        "test": list(test),
    }


def make_fold(cases: Sequence[dict], fold: int, num_folds: int = 5, label_fraction: float = 1.0, seed: int = 0,
              val_fraction: float = 0.15) -> dict:
    """Fold ``fold`` of a ``num_folds``-fold cross-validation of ``cases``, as an MSD-style datalist.

    The cases are shuffled once with ``seed`` and cut into ``num_folds`` near-equal parts: part ``fold`` is
    the ``test`` set, so over the folds every case is tested exactly once. From the other cases
    ``max(1, round(val_fraction * n))`` go to ``validation`` (none when ``val_fraction`` is 0) and the rest
    to ``training``, of which ``max(1, round(label_fraction * n_training))`` are ``labelled``. For one
    (seed, fold) the three sets do not depend on the label fraction and the labelled cases are nested
    across fractions (those at 0.1 are among those at 0.2), so fractions compare like with like.

    Only cases with a ``label`` are folded; cases without one (unlabelled scans) are in ``training`` of
    every fold as ``"labelled": false`` (pretraining and semi-supervised training use them).
    """
    if not 0 <= int(fold) < int(num_folds) or int(num_folds) < 2:
        raise ValueError(f"fold must be in [0, num_folds) with num_folds >= 2, got fold={fold}, num_folds={num_folds}")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    cases, without = _by_label(cases)
    if len(cases) < num_folds:
        extra = f" (and {len(without)} without a label)" if without else ""
        raise DataError([f"{len(cases)} labelled cases{extra} cannot make {num_folds} folds; expected at least "
                         f"{num_folds} cases with a segmentation"])
    parts = np.array_split(np.random.RandomState(seed).permutation(len(cases)), num_folds)
    test = [cases[i] for i in sorted(parts[fold], key=lambda i: cases[i]["case"])]
    rest = [cases[i] for j, part in enumerate(parts) if j != fold for i in part]
    rng = np.random.RandomState([seed, fold])
    rest = [rest[i] for i in rng.permutation(len(rest))]
    n_val = 0 if val_fraction <= 0 else min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    val, train = rest[:n_val], rest[n_val:]
    n_lab = max(1, int(round(label_fraction * len(train))))
    labelled = {c["case"] for c in train[:n_lab]}
    return {
        "seed": seed,
        "fold": int(fold),
        "num_folds": int(num_folds),
        "label_fraction": label_fraction,
        "training": [dict(c, labelled=c["case"] in labelled) for c in sorted(train, key=lambda c: c["case"])]
                    + [dict(c, labelled=False) for c in without],
        "validation": sorted(val, key=lambda c: c["case"]),
        "test": test,
    }


def write_datalist(datalist: dict, path: str | os.PathLike, base_dir: str | os.PathLike) -> Path:
    """Write ``datalist`` atomically, with image/label paths relative to ``base_dir`` (both resolved, so a
    data folder reached through a link still gives paths inside it)."""
    base = Path(base_dir).resolve()
    def relative(p):
        return os.path.relpath(Path(p).resolve(), base)

    out = {k: [_map_paths(c, relative) for c in v] if isinstance(v, list) else v for k, v in datalist.items()}
    return atomic_write_json(out, path)


def load_datalist(path: str | os.PathLike, base_dir: str | os.PathLike) -> dict:
    """Read a datalist JSON and resolve its relative paths against ``base_dir``."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError([f"{path}: missing; expected a datalist JSON (medssl data split writes one)"]) from None
    except json.JSONDecodeError as e:
        raise DataError([f"{path}: not valid JSON ({e}); expected an MSD-style datalist"]) from None
    base = Path(base_dir)

    missing = [k for k in ("training", "validation", "test") if k not in raw]
    if missing:
        raise DataError([f"{path}: lacks the keys {missing}; expected training, validation and test lists"])
    return {k: [_map_paths(c, lambda p: p if os.path.isabs(p) else str(base / p)) for c in v]
            if isinstance(v, list) else v for k, v in raw.items()}


def bundle_datalist(dataset_dir: str, datalist_file: str | None = None, label_fraction: float = 1.0,
                    seed: int = 0, layout: str | None = None, check: bool = True, **split_kwargs) -> dict:
    """The datalist a bundle stage uses, validated before any training.

    ``datalist_file`` (an MSD-style JSON, paths relative to ``dataset_dir``) when given, otherwise
    a seeded split of every case found in ``dataset_dir`` (cases without a segmentation go to
    ``training`` as unlabelled, see :func:`make_split`). With ``check`` every referenced file is
    read and validated, and every validation/test case and every training case flagged ``labelled``
    must have a ``label``; all problems are raised together as one :class:`DataError`. The returned
    dict also names its ``source`` (the data set folder, and the datalist file) and ``layout``, which
    :func:`labelled` uses in its messages; the counts are logged.
    """
    layout = layout or detect_layout(dataset_dir)
    if datalist_file:
        datalist = load_datalist(datalist_file, dataset_dir)
        context = f"datalist {datalist_file}"
        source = f"data set {dataset_dir} (datalist {datalist_file})"
    else:
        if not Path(dataset_dir).is_dir():
            raise DataError([f"{dataset_dir}: missing; expected the data set folder (set dataset_dir, or "
                             f"MEDSSL_DATA_DIR; `medssl data download` fetches the public sample)"])
        cases = LAYOUTS[layout](dataset_dir)
        if not cases:
            raise DataError([f"{dataset_dir}: no cases found; expected {EXPECTED_LAYOUT[layout]}"])
        datalist = make_split(cases, label_fraction=label_fraction, seed=seed, **split_kwargs)
        context = source = f"data set {dataset_dir}"
    if check:
        every = [c for k in ("training", "validation", "test") for c in datalist.get(k, [])]
        check_cases(every, layout, context=context)
        unlabelled_eval = [f"{k}: {_name(c)}: no label; expected {EXPECTED_LABEL[layout]} (validation and test cases "
                           "must be labelled; an unlabelled case belongs in training with \"labelled\": false)"
                           for k in ("validation", "test") for c in datalist.get(k, []) if "label" not in c]
        unlabelled_eval += [f"training: {_name(c)}: flagged labelled but has no label; expected {EXPECTED_LABEL[layout]}"
                            for c in datalist.get("training", []) if c.get("labelled") is True and "label" not in c]
        if unlabelled_eval:
            raise DataError(unlabelled_eval, context)
    datalist["source"], datalist["layout"] = source, layout
    train = datalist.get("training", [])
    n_lab = len([c for c in train if _is_labelled(c)])
    n_label_files = len([c for c in train if "label" in c])
    logger.info(f"{source}: {len(train)} training case(s) ({n_lab} labelled, {len(train) - n_label_files} without a "
                f"label), {len(datalist.get('validation', []))} validation and {len(datalist.get('test', []))} test "
                "case(s) (labelled only)")
    return datalist


def labelled(datalist: dict, slice_labels: bool = False) -> list[dict]:
    """The labelled training cases (every training case with a ``label`` when no ``labelled`` flag is present): what
    supervised training uses. Logs how many it found; none is a :class:`DataError` naming the data set
    (``datalist["source"]``, set by :func:`bundle_datalist`) and what was expected.

    A datalist that labels only some slices of its volumes (``"labelled_slices"``, written by
    :func:`medssl.data.label_slices`) is refused unless ``slice_labels`` (the stage keeps only those slices,
    ``medssl.transforms.SelectSlicesd``): a stage that used the whole volume would use labels outside the budget."""
    cases = [c for c in datalist["training"] if _is_labelled(c)]
    source = datalist.get("source", "datalist")
    partial = [_name(c) for c in cases if "labelled_slices" in c]
    if partial and not slice_labels:
        raise DataError([f"{source}: labels only some axial slices of {len(partial)} training volume(s) (first: "
                         f"{partial[0]}, \"labelled_slices\"; label_unit 'slice'); expected whole labelled volumes "
                         "for this stage (a split without --label_unit slice)"])
    if not cases:
        layout = datalist.get("layout", "brats")
        raise DataError([f"{source}: no labelled case ({len(datalist['training'])} training case(s), none with a "
                         f"label in use); expected at least one case with {EXPECTED_LABEL.get(layout, 'a label')} "
                         "for supervised training (pretraining needs none)"])
    logger.info(f"{source}: supervised training uses {len(cases)} labelled case(s) of {len(datalist['training'])} "
                "training case(s)")
    return cases


def evaluation_cases(datalist: dict, split: str = "test") -> list[dict]:
    """The cases of ``split`` (``"test"``, ``"validation"``; labelled, as :func:`bundle_datalist` checks): what
    evaluation scores. Logs how many; none (e.g. a data set without any label) is a :class:`DataError` naming
    the data set and what was expected, before anything is built."""
    cases = datalist.get(split, [])
    source = datalist.get("source", "datalist")
    if not cases:
        train = datalist.get("training", [])
        raise DataError([f"{source}: no labelled case in {split!r} ({len(train)} training case(s), "
                         f"{len([c for c in train if _is_labelled(c)])} labelled); expected labelled cases to evaluate on "
                         f"(evaluation needs ground truth; inference runs on unlabelled scans)"])
    logger.info(f"{source}: evaluating {len(cases)} labelled {split} case(s)")
    return cases


def unlabelled(datalist: dict) -> list[dict]:
    """The training cases not in :func:`labelled` (flagged ``"labelled": false``, or without a ``label``),
    label files dropped where a case has one: the unlabelled stream of semi-supervised training. A volume with
    only some slices labelled (``"labelled_slices"``) is in it too: its other slices are unlabelled data."""
    return [{k: v for k, v in c.items() if k not in ("label", "labelled_slices")} for c in datalist["training"]
            if not _is_labelled(c) or "labelled_slices" in c]


def _is_labelled(c: dict) -> bool:
    """A training case whose label supervised training uses: flagged ``labelled`` (or not flagged at all) and
    with a ``label``."""
    return bool(c.get("labelled", True)) and "label" in c


def _name(c: dict) -> str:
    image = c["image"][0] if isinstance(c["image"], (list, tuple)) else c["image"]
    return str(c.get("case") or Path(str(image)).name)


def datalist_digest(datalist: dict) -> str:
    """A short digest of which cases a datalist puts in which split and which training cases are labelled
    (by case name, so a moved data folder keeps it): the datalist part of a run's resume settings."""
    import hashlib
    import json

    def name(c):
        image = c["image"][0] if isinstance(c["image"], (list, tuple)) else c["image"]
        return (f"{c.get('case') or Path(str(image)).name}/{c.get('slice', '')}" + ("+tags" if "tags" in c else "")
                + (f"+slices{c['labelled_slices']}" if "labelled_slices" in c else ""))

    parts = {k: sorted([name(c), bool(c.get("labelled", True))] for c in v)
             for k, v in datalist.items() if isinstance(v, list) and v and isinstance(v[0], dict) and "image" in v[0]}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def all_training(datalist: dict) -> list[dict]:
    """Every training case, labels dropped (what self-supervised pretraining may see)."""
    return _unlabelled(datalist["training"])


def held_out(datalist: dict) -> list[dict]:
    """Every validation case, labels dropped: the held-out cases on which a pretraining's pretext is measured
    (:class:`medssl.engines.PretextHealth`; never the test cases)."""
    return _unlabelled(datalist.get("validation", []))


def _unlabelled(cases) -> list[dict]:
    return [{k: v for k, v in c.items() if k not in ("label", "labelled_slices")} for c in cases]


def inference_cases(dataset_dir: str, layout: str | None = None, check: bool = True,
                    modalities: Sequence[str] | None = None) -> list[dict]:
    """Every case of ``dataset_dir`` without labels (what inference reads), validated unless ``check=False``.

    ``modalities`` (BraTS layout) limits the cases to those modalities, in that order: only they have to
    exist (single-modality inference needs one file per case)."""
    layout = layout or detect_layout(dataset_dir)
    extra = {}
    if layout == "brats":
        from .layouts import BRATS_MODALITIES, brats_cases

        extra = {"modalities": tuple(modalities or BRATS_MODALITIES)}
        cases = brats_cases(dataset_dir, with_label=False, **extra)
    else:
        cases = [{k: v for k, v in c.items() if k != "label"} for c in LAYOUTS[layout](dataset_dir)]
    if check:
        check_cases(cases, layout, context=f"inference input {dataset_dir}", **extra)
    return cases


def select_modalities(cases: Sequence[dict], modalities: Sequence[str]) -> list[dict]:
    """BraTS ``cases`` whose ``image`` keeps only ``modalities`` (in that order; e.g. ``["flair", "t2"]``
    for the two networks of Semi-CML, ``["t2"]`` for single-modality inference). Only those files are
    then read."""
    from .layouts import BRATS_MODALITIES

    if isinstance(modalities, str):
        modalities = [modalities]
    unknown = [m for m in modalities if m not in BRATS_MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be some of {list(BRATS_MODALITIES)}, got {list(modalities)}")
    index = [BRATS_MODALITIES.index(m) for m in modalities]
    return [{**c, "image": [c["image"][i] for i in index]} for c in cases]
