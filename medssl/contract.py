"""The bundle contract: what every medssl bundle folder defines, so that ``medssl run``, the benchmark,
MONAI's own bundle tools, MONAI Label and the model zoo can use any of them without special cases.

A bundle is a folder ``bundles/<name>/`` with ``configs/``, ``docs/README.md`` and ``LICENSE``. Its
stages are config files in ``configs/``; :data:`OVERLAYS` says which of them are layered over
``train.json`` (run as ``--config_file "['configs/train.json','configs/<stage>.json']"``, the model
zoo's way) and which stand alone. :func:`check_bundle` checks a folder against the contract; the test
``tests/test_bundle_contract.py`` runs it over :func:`medssl.bundles.list_bundles`, so a new bundle is
covered without editing any list. See ``docs/adding_a_bundle.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

STAGES = ("pretrain", "train", "prel", "evaluate", "inference", "multi_gpu_train")
REQUIRED_STAGES = ("train", "evaluate", "inference", "multi_gpu_train")
# stage -> the configs it is layered over, in order (the stage's own file comes last)
OVERLAYS = {"pretrain": ("train",), "prel": ("train",), "evaluate": ("train",), "multi_gpu_train": ("train",)}
# which stages produce which files in ckpt_dir / output_dir (the chain: pretrain -> train -> evaluate)
STAGE_OUTPUTS = {"pretrain": "pretrained.pt", "train": "model.pt", "prel": "model.pt", "evaluate": "metrics.json"}

# ids read by MONAI's bundle properties, MONAI Label, the model zoo and medssl's own tools
COMMON_IDS = ("imports", "bundle_root", "device", "dataset_dir", "dataset_name", "network_def", "network", "dropout",
              "initialize", "run", "finalize")
TRAIN_IDS = ("ckpt_dir", "output_dir", "datalist_file", "seed", "max_epochs", "epoch_length", "val_interval",
             "train#trainer", "train#trainer#max_epochs", "train#dataset#data", "train#handlers", "train#inferer",
             "validate#evaluator", "validate#dataset#data", "validate#handlers")
# evaluate also exposes MONAI's inference properties at the top level (aliases of validate#...)
EVALUATE_IDS = ("ckpt_path", "eval_split", "validate#evaluator", "validate#handlers", "preprocessing", "dataset",
                "dataloader", "inferer", "postprocessing", "evaluator")
INFERENCE_IDS = ("ckpt_path", "output_dir", "preprocessing", "postprocessing", "inferer", "evaluator", "dataset",
                 "dataloader")
STAGE_IDS = {"train": TRAIN_IDS, "evaluate": TRAIN_IDS + EVALUATE_IDS, "inference": INFERENCE_IDS}

# metrics.json written by the evaluate stage (medssl.engines.MetricsReport / WeakSegReport): the number of
# test items, Dice and HD95 per region ({region: value}) and their means over regions, and one row per
# item: "per_case" ([{"case": id, "dice": {region: value}, "hd95": {...}}]) for volumes and images,
# "per_slice" for the weakly supervised slice evaluation
METRICS_KEYS = ("num_cases", "dice", "mean_dice", "hd95", "mean_hd95")
METRICS_ROW_KEYS = ("per_case", "per_slice")

METADATA_FIELDS = ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                   "required_packages_version", "name", "task", "description", "authors", "copyright",
                   "data_source", "intended_use", "references", "network_data_format", "medssl_paradigm")
PARADIGMS = ("self-supervised pretrain -> fine-tune", "semi-supervised", "weakly supervised")
BUNDLE_FILES = ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE")

MAX_EXPRESSION = 120  # characters of one "$" expression; longer logic is a function in medssl


def stage_files(stage: str) -> list[str]:
    """Config files (relative to the bundle folder) that make up ``stage``, base first."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    return [f"configs/{s}.json" for s in (*OVERLAYS.get(stage, ()), stage)]


def _expressions(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _expressions(v, f"{path}#{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _expressions(v, f"{path}#{i}")
    elif isinstance(obj, str) and obj.startswith("$"):
        yield path, obj


def _checkpoints(obj, path=""):
    """``(id, dict)`` of every :class:`medssl.engines.ResumableCheckpoint` a config (or a part of one) builds."""
    if isinstance(obj, dict):
        if str(obj.get("_target_", "")).endswith("ResumableCheckpoint"):
            yield path, obj
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield from _checkpoints(v, f"{path}#{k}" if path else str(k))


# what a ResumableCheckpoint's settings are: derived from the stage (medssl.bundles.run_settings), not listed
RESUME_SETTINGS = "$medssl.bundles.run_settings(@datalist, seed=@seed)"


def _stage_ids(files: list[Path]) -> set[str]:
    """Every id (``a#b#c``) defined by layering ``files`` as MONAI does."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    ids: set[str] = set()

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                ids.add(f"{prefix}{k}")
                walk(v, f"{prefix}{k}#")

    walk(parser.get(), "")
    return ids


def check_bundle(root: str | Path) -> list[str]:
    """Every way the bundle folder ``root`` breaks the contract, one line each (empty: it conforms)."""
    root = Path(root)
    problems = [f"{root / f}: missing" for f in BUNDLE_FILES if not (root / f).is_file()]
    problems += [f"{root}/configs/{s}.json: missing; every bundle has the stage {s!r}"
                 for s in REQUIRED_STAGES if not (root / "configs" / f"{s}.json").is_file()]
    stages = [s for s in STAGES if (root / "configs" / f"{s}.json").is_file()]
    meta_file = root / "configs" / "metadata.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        problems += [f"{meta_file}: no {k!r}" for k in METADATA_FIELDS if k not in meta]
        if meta.get("medssl_paradigm") not in PARADIGMS:
            problems.append(f"{meta_file}: medssl_paradigm {meta.get('medssl_paradigm')!r} is not one of {PARADIGMS}")
        if meta.get("version") not in meta.get("changelog", {}):
            problems.append(f"{meta_file}: version {meta.get('version')!r} has no changelog entry")
        if "medssl" not in meta.get("required_packages_version", {}):
            problems.append(f"{meta_file}: required_packages_version lacks medssl")
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        if not any(o.get("channel_def") for o in outputs.values()):
            problems.append(f"{meta_file}: network_data_format outputs name no channel_def")
    for stage in stages:
        files = [root / f for f in stage_files(stage)]
        own = json.loads(files[-1].read_text())
        if stage in OVERLAYS and "imports" in own:
            problems.append(f"{files[-1]}: an overlay on {OVERLAYS[stage]} must not repeat 'imports' and the base ids")
        if stage not in OVERLAYS and own.get("bundle_root") != ".":
            problems.append(f"{files[-1]}: bundle_root must default to '.' (the bundle folder), got "
                            f"{own.get('bundle_root')!r}")
        for path, expr in _expressions(own):
            if len(expr) > MAX_EXPRESSION:
                problems.append(f"{files[-1]}: {path}: a {len(expr)}-character expression (max {MAX_EXPRESSION}); "
                                "make it a documented function in medssl")
        for path, ckpt in _checkpoints(own):
            if not str(ckpt.get("settings", "")).startswith("$medssl.bundles.run_settings("):
                problems.append(f"{files[-1]}: {path}: a ResumableCheckpoint whose settings are not derived from the "
                                f"stage; expected \"settings\": \"{RESUME_SETTINGS}\"")
        problems += [f"{files[-1]}: {k!r}: a hand-kept list of run settings; expected none (the checkpoint derives "
                     f"them: every setting but medssl.bundles.RESUME_MAY_CHANGE)"
                     for k in own if k.split("#")[0] == "run_settings"]
        text = files[-1].read_text()
        if re.search(r"\.\./|bundles/", text):
            problems.append(f"{files[-1]}: refers to a file outside its bundle folder")
        if stage == "multi_gpu_train":
            continue
        ids = _stage_ids(files)
        required = COMMON_IDS + STAGE_IDS.get(stage, ())
        problems += [f"{files[-1]}: stage {stage!r} lacks the id {i!r}" for i in required if i not in ids]
    return problems
