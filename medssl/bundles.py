"""Where the bundles are, what they are, and running one of their stages in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import PACKAGE_DIR
from .contract import STAGES, stage_files


def bundles_dir() -> Path:
    """``$MEDSSL_BUNDLES_DIR``; else the ``bundles/`` folder beside the package (a source checkout, editable
    install); else the copy an installed wheel carries in the package (``medssl/_bundles``, see setup.py)."""
    if os.environ.get("MEDSSL_BUNDLES_DIR"):
        return Path(os.environ["MEDSSL_BUNDLES_DIR"])
    checkout = PACKAGE_DIR.parent / "bundles"
    return checkout if checkout.is_dir() else PACKAGE_DIR / "_bundles"


def bundle_path(name: str) -> Path:
    p = bundles_dir() / name
    if not (p / "configs" / "metadata.json").is_file():
        known = ", ".join(b["name"] for b in list_bundles()) or "none"
        raise ValueError(f"{p}: no bundle named {name!r}; expected one of: {known}")
    return p


def bundle_stages(root: Path) -> list[str]:
    """The stages whose config a bundle folder has."""
    return [s for s in STAGES if (root / "configs" / f"{s}.json").is_file()]


def stage_config_files(root: Path, stage: str) -> list[Path]:
    """The config files of ``stage`` in bundle folder ``root``, layered as the contract says (e.g.
    ``[configs/train.json, configs/evaluate.json]``), each checked to exist."""
    files = [Path(root) / f for f in stage_files(stage)]
    if not files[-1].is_file():
        raise ValueError(f"{files[-1]}: bundle {Path(root).name!r} has no stage {stage!r}; expected one of "
                         f"{bundle_stages(Path(root))}")
    return files


def format_config(obj, indent: int = 0, width: int = 120, _key: int = 0) -> str:
    """The canonical JSON text of a bundle config: a value stays on one line while it fits in ``width``
    characters, else its items go one per line, indented by 4 (``tests/test_bundle_contract.py``
    keeps every shipped config in this form)."""
    text = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or indent + _key + len(text) <= width:
        return text
    pad = " " * (indent + 4)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {format_config(v, indent + 4, width, len(json.dumps(k)) + 2)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + format_config(v, indent + 4, width) for v in obj) + "\n" + " " * indent + "]"


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


def stage_settings(bundle: str, stage: str) -> dict:
    """The settings a user can override on ``stage`` of ``bundle`` (``--id value``): its configs' top-level
    ids whose defaults are plain values (numbers, strings, booleans, lists of them; the overlays' values
    win), not the objects the stage builds."""
    return stage_settings_of(bundle_path(bundle), stage)


def stage_settings_of(root: str | os.PathLike, stage: str) -> dict:
    """:func:`stage_settings` of the bundle in folder ``root`` (e.g. a copy served by MONAI Label)."""
    return _plain_settings(stage_config_files(Path(root), stage))


def _layered(files) -> dict:
    """The stage's config files merged top-level id by id, the later (overlay) file winning, as read for its
    settings (not resolved)."""
    merged: dict = {}
    for f in files:
        merged.update(json.loads(Path(f).read_text()))
    return merged


def _plain_settings(files) -> dict:
    return _plain(_layered(files))


def _plain(merged: dict) -> dict:
    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, list) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v))

    return {k: v for k, v in merged.items() if k != "imports" and plain(v)}


class SettingError(ValueError):
    """A stage setting given a value of the wrong kind."""


def check_overrides(bundle: str, stage: str, overrides: dict) -> dict:
    """Refuse, naming the setting, an id the stage's configs do not have (with the nearest one they do) and an
    override whose value cannot be what its default is: a number for a numeric default, true/false for a
    boolean, a list for a list (an expression ``$...`` passes as is). Returns the overrides with the booleans
    users type (``false``/``true``/``0``/``1``, any case) made booleans where the default is one."""
    merged = _layered(stage_config_files(bundle_path(bundle), stage))
    _check_known(merged, overrides, f"{bundle} {stage}")
    defaults = _plain(merged)
    overrides = {k: _as_bool(v) if isinstance(defaults.get(k), bool) else v for k, v in overrides.items()}
    _check_kinds(defaults, overrides, f"{bundle} {stage}")
    return overrides


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _as_bool(value):
    """``value`` as a boolean where it spells one (``"false"``, ``"True"``, ``0``, ``"1"``), else unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _BOOLS:
        return _BOOLS[str(value).strip().lower()]
    return value


def _check_known(merged: dict, overrides: dict, where: str) -> None:
    """A ``SettingError`` for the first override id (``a#b#c`` or a top-level id) that the layered configs
    ``merged`` (:func:`_layered`) do not define, naming the nearest id they do (a mistyped ``--learning_rat`` must
    not train at the default)."""
    import difflib

    ids = set()

    def walk(obj, key):
        if key:
            ids.add(key)
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}#{k}" if key else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{key}#{i}")

    walk(merged, "")
    for key in overrides:
        if key in ids or key in _MONAI_ARGS or key in _PLACE:
            continue
        near = difflib.get_close_matches(key, sorted(i for i in ids if "#" not in i), n=1)
        raise SettingError(f"setting {key!r} of {where}: no such id in its configs"
                           + (f" (did you mean {near[0]!r}?)" if near else "")
                           + "; `medssl run BUNDLE STAGE --help` lists the settings")


# the kind of a default -> what a setting of it must be, and the test of a value (bool before int: a bool is an int)
_KINDS = ((bool, "true or false", lambda v: isinstance(v, bool)),
          (int, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          (float, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          (list, "a list", lambda v: isinstance(v, (list, tuple))))


def _check_kinds(defaults: dict, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        if key not in defaults or (isinstance(value, str) and value.startswith(("$", "@"))):
            continue
        default = defaults[key]
        for kind, expected, fits in _KINDS:
            if isinstance(default, kind):
                if not fits(value):
                    raise SettingError(f"setting {key!r} of {where}: got {value!r}, expected {expected} "
                                       f"(default {json.dumps(default)})")
                break


def check_command_line(bundle_root: str) -> bool:
    """Under ``python -m monai.bundle run`` (a config's first ``initialize`` expression calls this): the
    ``--id value`` settings of its command line checked as :func:`check_overrides` does, against the
    defaults of the ``--config_file`` files; a bad one prints one line and exits with code 2, before
    anything is built. Elsewhere (``medssl run``, which checks its own; the harness) it does nothing."""
    import sys

    from fire.parser import DefaultParseValue

    if not sys.argv or not sys.argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py"):
        return True
    args, overrides = sys.argv[1:], {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "True"
            overrides[key.replace("-", "_")] = DefaultParseValue(value)
    if overrides.get("args_file"):  # its pairs lie beneath the command line's, as monai.bundle.run merges them
        from monai.bundle import ConfigParser

        overrides = {**ConfigParser.load_config_file(str(overrides["args_file"])), **overrides}
    files = overrides.pop("config_file", [])
    if isinstance(files, str):  # one file, or several joined by commas (as monai.bundle.run reads them)
        files = files.split(",") if "," in files and not Path(files).is_file() else [files]
    files = list(files)
    for key in ("meta_file", "logging_file", "bundle_root", "args_file"):
        overrides.pop(key, None)
    try:
        _check_kinds(_plain_settings(Path(f) for f in files), overrides, f"bundle {Path(bundle_root).resolve().name}")
    except SettingError as e:
        print(f"monai.bundle run: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _note_run(Path(bundle_root).resolve().name, files, overrides)
    return True


def run_stage(bundle: str | os.PathLike, stage: str, logging_file: str | bool | None = None, **overrides):
    """Run ``stage`` of ``bundle`` (a name, or a bundle folder as a ``Path``) exactly as ``python -m
    monai.bundle run`` does, with ``bundle_root`` set to the bundle's absolute path unless overridden.
    Overlay stages (``evaluate``, ``pretrain``, ``prel``, ``multi_gpu_train``; :data:`medssl.contract.OVERLAYS`)
    are layered over ``train.json`` as the model zoo does (start ``multi_gpu_train`` under ``torchrun``)."""
    from monai.bundle import run

    root = Path(bundle) if isinstance(bundle, os.PathLike) else bundle_path(bundle)
    files = [str(f) for f in stage_config_files(root, stage)]
    overrides.setdefault("bundle_root", str(root))
    _note_run(root.name, files, overrides)
    if logging_file is None:
        logging_file = str(root / "configs" / "logging.conf")
    try:
        return run(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                   logging_file=logging_file, **overrides)
    finally:  # a config parsed by hand later in this process is not this stage
        _RUN.clear()


# What a run's folder needs to be used on its own: ``run.json`` (:func:`write_run_record`).
RUN_RECORD = "run.json"
# settings that say where a run is, not what it is: never carried from a run's record to another stage
_PLACE = ("bundle_root", "ckpt_dir", "output_dir", "resume", "device", "dataset_dir", "logging_file", "meta_file",
          "config_file", "args_file", "initialize", "run", "finalize")
_RUN: dict = {}  # the stage being run in this process (set by run_stage / check_command_line)

# The settings a resumed run may change (:func:`run_settings`; ``docs/user_guide.md``): every other setting of
# a training stage must be what the checkpoint was trained with. A config id is exempt when one of the keys on
# its path is one of these (``num_workers`` exempts ``train#dataloader#num_workers`` too).
RESUME_MAY_CHANGE = (
    # the budget and its pace: a resumed run trains on to the new max_epochs, validates, stops early and
    # snapshots as now told
    "max_epochs", "val_interval", "patience", "snapshot_steps",
    # how, not what: loader workers, progress bars, the device, and whether to resume at all
    "num_workers", "progress", "device", "resume",
    # places: the bundle, data and output folders, the datalist's file (its content counts: the ``datalist``
    # digest) and the weights a stage starts from (a resumed run takes its weights from the checkpoint)
    "bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "datalist_file", "pretrained_ckpt", "cml_ckpt",
    # MONAI's own arguments, the imports and the entry points
    "logging_file", "meta_file", "config_file", "args_file", "imports", "initialize", "run", "finalize")
# arguments of ``monai.bundle.run`` / ``ConfigWorkflow`` that are not config ids
_MONAI_ARGS = ("workflow_name", "workflow_type", "properties_path", "init_id", "run_id", "final_id", "tracking",
               "logging_file", "meta_file", "config_file", "args_file")


def _note_run(bundle: str, files, overrides: dict) -> None:
    files = [str(f) for f in files]
    given = {k: v for k, v in overrides.items() if k not in _MONAI_ARGS}
    _RUN.clear()
    _RUN.update(bundle=bundle, stage=Path(files[-1]).stem if files else None, config_files=files,
                overrides=given, settings={**_plain_settings(Path(f) for f in files), **given})


def resume_settings(bundle: str | os.PathLike, stage: str, overrides: dict | None = None, datalist: dict | None = None,
                    **resolved) -> dict:
    """What a checkpoint of ``stage`` of ``bundle`` (a name, or a bundle folder as a ``Path``) run with
    ``overrides`` must have been trained with to be resumed: every id of the stage's configs layered as MONAI
    does, the overrides set (as ``monai.bundle.run`` sets them), not resolved, as ``{"a#b#c": value}`` leaves
    (a list of plain values is one leaf), less the ids :data:`RESUME_MAY_CHANGE` exempts. Expressions count as
    written: with the plain settings they refer to, they determine what the stage resolves. ``datalist`` (the
    resolved one) replaces the ``datalist`` expression by :func:`medssl.data.datalist_digest` of it (which
    cases, not where they are); ``resolved`` (e.g. ``seed``) replace their ids by resolved values."""
    root = Path(bundle) if isinstance(bundle, os.PathLike) else bundle_path(bundle)
    return _resume_settings(stage_config_files(root, stage), overrides or {}, datalist, resolved)


def _resume_settings(files, overrides: dict, datalist, resolved: dict) -> dict:
    from monai.bundle import ConfigParser

    from .engines.handlers import _comparable

    parser = ConfigParser(config=ConfigParser.load_config_files([str(f) for f in files]))
    parser.update({k: v for k, v in overrides.items() if k not in _MONAI_ARGS})
    leaves: dict = {}

    def flatten(obj, key):
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                flatten(v, f"{key}#{k}" if key else str(k))
        elif isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in obj):
            for i, v in enumerate(obj):
                flatten(v, f"{key}#{i}")
        elif not set(key.split("#")) & {*RESUME_MAY_CHANGE, parser.meta_key}:
            leaves[key] = obj

    flatten(parser.get(), "")
    if datalist is not None:
        leaves["datalist"] = _digest(datalist)
    leaves.update(resolved)
    return _comparable(leaves)


def run_settings(datalist: dict | None = None, **resolved) -> dict:
    """The settings a training stage's :class:`medssl.engines.ResumableCheckpoint` compares on resume, derived
    from the stage being run (recorded by :func:`run_stage`, or by :func:`check_command_line` under ``python -m
    monai.bundle run``): :func:`resume_settings` of its config files and overrides, with the digest of
    ``datalist`` (the resolved datalist) and the ``resolved`` values (``seed``: it seeds the epochs). A
    bundle's checkpoint handler gets ``"settings": "$medssl.bundles.run_settings(@datalist, seed=@seed)"``; no
    list is kept by hand. Where no stage is being run (a config parsed by hand) it warns and returns only
    what it is given."""
    if not _RUN.get("config_files"):
        import warnings

        from .engines.handlers import _comparable

        given = {**({} if datalist is None else {"datalist": _digest(datalist)}), **resolved}
        warnings.warn("medssl.bundles.run_settings: no bundle stage is being run (started neither by medssl.bundles."
                      "run_stage / medssl run nor by python -m monai.bundle run); a resume compares only "
                      f"{', '.join(given) or 'nothing'}", stacklevel=2)
        return _comparable(given)
    return _resume_settings(_RUN["config_files"], _RUN.get("overrides", {}), datalist, resolved)


def _digest(datalist: dict) -> str:
    from .data import datalist_digest

    return datalist_digest(datalist)


def write_run_record(ckpt_dir, run_settings: dict | None = None) -> Path:
    """Write ``ckpt_dir/run.json`` (atomically) for the training stage being run: the bundle and stage, the
    settings given to it (``overrides``), every setting of its configs with those applied (``settings``), its
    ``run_settings`` (what a resume must match: :func:`run_settings`) and the versions. Called by
    :class:`medssl.engines.ResumableCheckpoint` once the run has passed its resume check, so a refused run
    leaves an earlier record alone. :func:`recorded_settings` reads it back."""
    import monai
    import torch

    from . import __version__
    from .utils import atomic_write_json

    record = {**json.loads(json.dumps(_RUN, default=str)), "run_settings": run_settings or {},
              "versions": {"medssl": __version__, "monai": monai.__version__, "torch": torch.__version__}}
    return atomic_write_json(record, Path(ckpt_dir) / RUN_RECORD)


def read_run_record(ckpt_dir) -> dict:
    """``ckpt_dir/run.json`` (:func:`write_run_record`); ``ValueError`` naming the file where it is missing or
    not JSON."""
    path = Path(ckpt_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable run record ({e}); expected the JSON a training stage writes") from None


def recorded_settings(bundle: str, stage: str, ckpt_dir, changed_only: bool = True) -> dict:
    """The settings a model in ``ckpt_dir`` was trained with (its ``run.json``) that ``stage`` of ``bundle``
    also has with another default - what evaluating or running that model needs (network sizes and
    switches, the datalist) - less those that say where things are (``ckpt_dir``, ``output_dir``, ...).
    With ``changed_only`` false, also those equal to the stage's default (to reset a config that another
    run's settings were applied to). Empty without a record."""
    path = Path(ckpt_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    record = read_run_record(ckpt_dir)
    if record.get("bundle") not in (None, bundle):
        raise ValueError(f"{path}: a run of bundle {record.get('bundle')!r}; expected one of {bundle!r}")
    merged = _layered(stage_config_files(bundle_path(bundle), stage))
    own, ids = _plain(merged), set(merged)
    # a top-level setting with another value, or a nested one (``network_def#channels``) the stage also builds
    def value(v):  # not an expression or reference, which the stage's own config resolves
        return not any(isinstance(x, str) and x.startswith(("$", "@", "%")) for x in (v if isinstance(v, list) else [v]))

    return {k: v for k, v in record.get("settings", {}).items() if k not in _PLACE and value(v) and
            ((v != own[k] or not changed_only) if k in own else "#" in k and k.split("#")[0] in ids)}


def trained_with(ckpt_dir) -> str:
    """``--id value ...`` of the settings given to the training recorded in ``ckpt_dir/run.json`` (less the
    places), for a message; empty without a record."""
    path = Path(ckpt_dir) / RUN_RECORD
    try:
        given = json.loads(path.read_text()).get("overrides", {})
    except (OSError, json.JSONDecodeError):
        return ""
    return " ".join(f"--{k} {json.dumps(v)}" for k, v in given.items() if k not in _PLACE)


def set_config_id(config: dict, key: str, value) -> None:
    """Set config id ``key`` (``a#b#c`` for a nested one; list items by index) in a bundle config dict, as
    MONAI's ``ConfigParser`` addresses it: how a served or packaged ``inference.json`` gets a run's settings."""
    parts = key.split("#")
    node = config
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def inference_weights(run_dir, inference: dict) -> Path:
    """The file of a trained run's folder that the network of ``inference`` (an inference.json as a dict)
    loads: ``model_<modality>.pt`` where inference.json builds one modality network (semi_cml, whose run's
    ``model.pt`` holds both), else ``model.pt``. Raises ``FileNotFoundError`` naming the file."""
    modality = inference.get("modality")
    path = Path(run_dir) / (f"model_{modality}.pt" if modality else "model.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected the run's {modality} network (the modality inference.json "
                                f"uses)" if modality else f"{path}: missing; expected a trained run's folder")
    return path
