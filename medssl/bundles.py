"""Where the bundles are, what they are, and running one of their stages in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import PACKAGE_DIR

STAGES = ("pretrain", "train", "prel", "evaluate", "inference", "multi_gpu_train")


def bundles_dir() -> Path:
    """``$MEDSSL_BUNDLES_DIR``, else the ``bundles/`` folder beside the package (editable install)."""
    return Path(os.environ.get("MEDSSL_BUNDLES_DIR") or PACKAGE_DIR.parent / "bundles")


def bundle_path(name: str) -> Path:
    p = bundles_dir() / name
    if not (p / "configs" / "metadata.json").is_file():
        known = ", ".join(b["name"] for b in list_bundles()) or "none"
        raise ValueError(f"{p}: no bundle named {name!r}; expected one of: {known}")
    return p


def bundle_stages(root: Path) -> list[str]:
    """The stages whose config a bundle folder has."""
    return [s for s in STAGES if (root / "configs" / f"{s}.json").is_file()]


def list_bundles() -> list[dict]:
    """Name, paper, paradigm and stages of every shipped bundle (read from its metadata.json)."""
    out = []
    root = bundles_dir()
    for meta in sorted(root.glob("*/configs/metadata.json")):
        m = json.loads(meta.read_text())
        out.append({"name": meta.parent.parent.name, "paper": (m.get("references") or [""])[0],
                    "paradigm": m.get("medssl_paradigm", ""), "stages": bundle_stages(meta.parent.parent),
                    "version": m.get("version", "")})
    return out


def run_stage(bundle: str, stage: str, logging_file: str | bool | None = None, **overrides):
    """Run ``configs/<stage>.json`` of ``bundle`` exactly as ``python -m monai.bundle run`` does, with
    ``bundle_root`` set to the bundle's absolute path unless overridden. ``multi_gpu_train`` is
    layered over ``train.json`` as the model zoo does (start it under ``torchrun``)."""
    from monai.bundle import run

    root = bundle_path(bundle)
    config = root / "configs" / f"{stage}.json"
    if not config.is_file():
        raise ValueError(f"{config}: bundle {bundle!r} has no stage {stage!r}; expected one of {bundle_stages(root)}")
    overrides.setdefault("bundle_root", str(root))
    if logging_file is None:
        logging_file = str(root / "configs" / "logging.conf")
    files = [str(root / "configs" / "train.json"), str(config)] if stage == "multi_gpu_train" else str(config)
    return run(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
               logging_file=logging_file, **overrides)
