"""A bundle zoo for the medssl bundles, in the MONAI model zoo's layout and formats.

- :func:`package`: a model-zoo bundle folder (``configs/``, ``docs/``, ``LICENSE``, ``models/model.pt`` from a
  trained run, ``models/model.ts`` from MONAI's ``ckpt_export``, ``large_files.yml`` with the weights' URLs and
  SHA-256) and its zip ``<name>_v<version>.zip`` (files over the size limit stay out of the zip and are fetched
  through ``large_files.yml``, as in the model zoo).
- :func:`verify`: the checks the model zoo's CI (``ci/verify_bundle.py``) runs, offline: one
  :class:`Check` per line.
- :func:`index`: ``model_info.json`` (``{"<name>_v<version>": {"version", "checksum" (SHA-1 of the zip),
  "source"}}``) for a folder of packaged zips, which MONAI's ``get_all_bundles_list`` / ``download`` read.
- :func:`install`: a bundle from such a zoo (a folder or a URL), with every hash checked, the zip's paths
  checked before anything is extracted, the large files fetched and the bundle checked in a temporary folder
  that is renamed into place only when all of it passed (a refusal leaves nothing behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .utils import file_hash

MAX_FILE_MB = 25.0  # the model zoo's limit for a file kept in the repository (larger: large_files.yml)
LARGE_FILES = "large_files.yml"
MODEL_INFO = "model_info.json"
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt", "docs/README.md")
ZIP_TIME = (2022, 5, 30, 0, 0, 0)  # fixed member times: the same bundle gives the same zip (and checksum)


class ZooError(ValueError):
    """Bad zoo input (a package, an index entry, a download), refused with one message."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}" + (f": {self.detail}" if self.detail else "")


# --- hashes, URLs ---------------------------------------------------------------------------------------------

def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(str(s)).scheme in ("http", "https", "file")


def _join(base: str, rel: str) -> str:
    """``rel`` resolved against a zoo location (a URL or a folder); an absolute URL is returned as is."""
    if _is_url(rel):
        return rel
    if _is_url(base):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return str(Path(base) / rel)


def _fetch(src: str, dest: Path) -> None:
    """Copy a URL (http, https, file) or a local path to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if _is_url(src):
            with urllib.request.urlopen(src, timeout=60) as r, open(dest, "wb") as f:  # noqa: S310 (zoo URLs)
                shutil.copyfileobj(r, f)
        else:
            shutil.copyfile(src, dest)
    except (OSError, ValueError) as e:
        raise ZooError(f"{src}: cannot be fetched ({e})") from None


def _safe_member(root: Path, rel: str) -> Path:
    """``root/rel``, refused unless it stays inside ``root`` (no absolute path, no ``..``)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts or ":" in p.parts[0]:
        raise ZooError(f"{rel!r}: a path that escapes the bundle folder; expected a relative path inside it")
    return root.joinpath(*p.parts)


# --- metadata and large_files.yml -----------------------------------------------------------------------------

def read_large_files(root: Path) -> list[dict]:
    """The entries of ``root/large_files.yml`` (``path``, ``url``, ``hash_val``, ``hash_type``); [] without one."""
    import yaml

    f = Path(root) / LARGE_FILES
    if not f.is_file():
        return []
    try:
        entries = (yaml.safe_load(f.read_text()) or {}).get("large_files", [])
    except yaml.YAMLError as e:
        raise ZooError(f"{f}: unreadable ({e}); expected the model zoo's large_files.yml") from None
    for e in entries:
        if not isinstance(e, dict) or not e.get("path") or not e.get("url"):
            raise ZooError(f"{f}: entry {e!r}; expected path and url (and hash_val, hash_type)")
        _safe_member(Path(root), e["path"])
    return entries


def _version_tuple(v: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(v))
    except InvalidVersion:
        return None


def metadata_problems(root: Path) -> list[str]:
    """What in ``configs/metadata.json`` the zoo refuses: invalid against the schema the package ships (read
    offline), version without a changelog entry, a monai_version that is not a version or is newer than the
    installed MONAI, a missing network_data_format, required_packages_version without medssl."""
    import monai
    from monai.bundle import verify_metadata

    from . import SCHEMA_FILE

    f = Path(root) / "configs" / "metadata.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{f}: unreadable ({e})"]
    problems = []
    if not isinstance(meta.get("network_data_format"), dict) or not meta["network_data_format"].get("inputs"):
        problems.append(f"{f}: no network_data_format (inputs and outputs of the network); the model zoo needs it")
    try:
        verify_metadata(meta_file=str(f), filepath=str(SCHEMA_FILE))
    except Exception as e:  # ValidationError from jsonschema, or an unreadable file
        problems.append(f"{f}: does not validate against {SCHEMA_FILE.name}: {str(e).splitlines()[0]}")
    if meta.get("version") not in (meta.get("changelog") or {}):
        problems.append(f"{f}: version {meta.get('version')!r} has no changelog entry")
    need, have = _version_tuple(meta.get("monai_version", "")), _version_tuple(monai.__version__.split("+")[0])
    if need is None:
        problems.append(f"{f}: monai_version {meta.get('monai_version')!r} is not a version; expected e.g. "
                        f"{monai.__version__!r}")
    elif have is not None and need > have:
        problems.append(f"{f}: monai_version {meta['monai_version']!r} is newer than the installed MONAI "
                        f"{monai.__version__}; expected at most that")
    if "medssl" not in (meta.get("required_packages_version") or {}):
        problems.append(f"{f}: required_packages_version lacks medssl")
    return problems


# --- package --------------------------------------------------------------------------------------------------

def _weights_of(bundle: str, run_dir: Path, inference: dict) -> dict[str, Path]:
    """``{packaged file name: run file}``: the network inference.json loads, as ``model.pt``; semi_cml's
    inference modality's network (``model_<modality>.pt``, its run's model.pt holds both) also under its own
    name, with every other modality network of the run, so ``--modality`` still picks one."""
    if not (run_dir / "model.pt").is_file():
        raise ZooError(f"{run_dir}: no model.pt; expected a trained run's folder (--weights RUN_DIR)")
    from .bundles import inference_weights

    try:
        files = {"model.pt": inference_weights(run_dir, inference)}
    except FileNotFoundError as e:
        raise ZooError(str(e)) from None
    if "modality" not in inference:
        return files
    files.update({p.name: p for p in sorted(run_dir.glob("model_*.pt"))
                  if p.stem[len("model_"):] in inference.get("modalities", [])})
    return files


def _plain_state(src: Path, network) -> dict:
    """The tensors of checkpoint ``src`` as a plain state dict, checked against ``network``."""
    import torch

    from .networks import load_pretrained
    from .networks.weights import _state_dict

    load_pretrained(network, src, allow_head_mismatch=False)  # refuses another network, naming the file
    return dict(_state_dict(torch.load(src, map_location="cpu", weights_only=True), src))


def package(bundle: str, out, weights, base_url: str = "", max_file_mb: float = MAX_FILE_MB) -> Path:
    """Package ``bundle`` with the weights of the trained run ``weights`` into ``out/<bundle>/`` and
    ``out/<bundle>_v<version>.zip``; returns the zip.

    The settings the run recorded (run.json) that inference.json also has are written into the packaged
    inference.json, so the packaged network is the trained one. ``base_url`` is where ``out`` will be served
    (default: its ``file://`` URI): large_files.yml points at ``<base_url>/<bundle>/<path>``.
    """
    import monai
    import numpy
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    from . import __version__
    from .bundles import bundle_path, format_config, recorded_settings, set_config_id

    src, out, run_dir = bundle_path(bundle), Path(out), Path(weights)
    out.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or out.resolve().as_uri()).rstrip("/")
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    version = meta["version"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle}.", dir=out))
    try:
        root = tmp / bundle
        shutil.copytree(src / "configs", root / "configs")
        shutil.copytree(src / "docs", root / "docs")
        shutil.copy(src / "LICENSE", root / "LICENSE")
        # the packaged inference.json builds the network the run trained
        inference = json.loads((root / "configs" / "inference.json").read_text())
        settings = recorded_settings(bundle, "inference", run_dir)
        for key, value in settings.items():
            set_config_id(inference, key, value)
        (root / "configs" / "inference.json").write_text(format_config(inference) + "\n")
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
        parser["bundle_root"] = str(root)
        models = root / "models"
        models.mkdir()
        for name, f in _weights_of(bundle, run_dir, inference).items():
            torch.save(_plain_state(f, parser.get_parsed_content("network_def", instantiate=True, lazy=False)),
                       models / name)
        run_record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        meta.update(monai_version=monai.__version__.split("+")[0], pytorch_version=torch.__version__.split("+")[0],
                    numpy_version=numpy.__version__)
        meta["required_packages_version"] = {**meta.get("required_packages_version", {}), "medssl": __version__}
        meta["medssl_weights"] = {"run": run_record.get("stage", "unrecorded"),
                                  "settings": {k: settings[k] for k in sorted(settings)},
                                  "trained_with": run_record.get("overrides", {})}
        (root / "configs" / "metadata.json").write_text(format_config(meta) + "\n")
        ckpt_export(net_id="network_def", filepath=str(models / "model.ts"), ckpt_file=str(models / "model.pt"),
                    meta_file=str(root / "configs" / "metadata.json"),
                    config_file=str(root / "configs" / "inference.json"), bundle_root=str(root))
        entries = [{"path": f"models/{p.name}", "url": f"{base_url}/{bundle}/models/{p.name}",
                    "hash_val": file_hash(p), "hash_type": "sha256"} for p in sorted(models.iterdir())]
        import yaml

        (root / LARGE_FILES).write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
        zip_tmp = tmp / f"{bundle}_v{version}.zip"
        _write_zip(root, zip_tmp, skip={e["path"] for e in entries
                                        if (root / e["path"]).stat().st_size > max_file_mb * 2**20})
        final, zip_final = out / bundle, out / zip_tmp.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(root, final)
        os.replace(zip_tmp, zip_final)
        return zip_final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_zip(root: Path, dest: Path, skip=()) -> None:
    """Zip folder ``root`` with ``root.name`` as the base folder (MONAI's ``extractall(has_base=True)``),
    members sorted with fixed times; ``skip``: relative paths left out (fetched through large_files.yml)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in skip:
                info = zipfile.ZipInfo(f"{root.name}/{rel}", ZIP_TIME)
                info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
                z.writestr(info, p.read_bytes())


# --- verify ---------------------------------------------------------------------------------------------------

def fetch_large_files(root: Path, base: str = "") -> list[str]:
    """Fetch each large_files.yml entry absent from ``root`` (a relative url against ``base``) and check every
    entry's hash; refuses a mismatch naming the file. Returns the paths fetched."""
    fetched = []
    for e in read_large_files(root):
        dest = _safe_member(root, e["path"])
        if not dest.is_file():
            _fetch(_join(base, e["url"]) if base else e["url"], dest)
            fetched.append(e["path"])
        if e.get("hash_val"):
            got = file_hash(dest, e.get("hash_type") or "md5")
            if got != e["hash_val"]:
                raise ZooError(f"{dest}: {e.get('hash_type') or 'md5'} {got} does not match large_files.yml "
                               f"({e['hash_val']}); the weight file is corrupt or was replaced")
    return fetched


def _spatial_input(meta: dict):
    """A random input of the metadata's first input shape (n=1), for comparing two exported networks."""
    import torch
    from monai.bundle.scripts import _get_fake_spatial_shape

    image = meta["network_data_format"]["inputs"]["image"]
    shape = _get_fake_spatial_shape(image["spatial_shape"], p=1, n=1, any=8)
    return torch.randn((1, image["num_channels"], *shape), generator=torch.Generator().manual_seed(0))


def verify(path, max_file_mb: float = MAX_FILE_MB) -> list[Check]:
    """The model zoo CI's checks on the bundle folder ``path`` (large files fetched first, as its CI does)."""
    import torch
    from monai.bundle import ConfigWorkflow, ckpt_export, load, verify_net_in_out

    root = Path(path).resolve()
    checks: list[Check] = []

    def run(name, fn):
        try:
            detail = fn()
            checks.append(Check(name, True, detail or ""))
        except Exception as e:  # every failure is one line
            first = (str(e).strip().splitlines() or [""])[0]
            checks.append(Check(name, False, f"{type(e).__name__}: {first}"))
        return checks[-1].ok

    def large():
        got = fetch_large_files(root)
        n = len(read_large_files(root))
        return f"{n} listed, hashes match" + (f", fetched {', '.join(got)}" if got else "") if n else "none listed"

    def required():
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise ZooError(f"necessary file(s) {', '.join(missing)} missing")
        return ", ".join(REQUIRED_FILES)

    def metadata():
        problems = metadata_problems(root)
        if problems:
            raise ZooError("; ".join(problems))
        return "valid against the shipped schema"

    def changelog():
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        if meta.get("version") not in (meta.get("changelog") or {}):
            raise ZooError(f"version {meta.get('version')!r} is missing in the changelog")
        return f"version {meta['version']}"

    def sizes():
        listed = {e["path"] for e in read_large_files(root)}
        big = [f"{p.relative_to(root).as_posix()} ({p.stat().st_size / 2**20:.1f} MB)" for p in root.rglob("*")
               if p.is_file() and p.stat().st_size > max_file_mb * 2**20
               and p.relative_to(root).as_posix() not in listed]
        if big:
            raise ZooError(f"over {max_file_mb:g} MB and not in {LARGE_FILES}: {', '.join(big)}")
        return f"every file under {max_file_mb:g} MB or listed in {LARGE_FILES}"

    meta_file, config = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")

    def net_in_out():
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config, bundle_root=str(root),
                          device="cpu")
        return "network_def at the metadata's shapes (n=1)"

    def export():
        with tempfile.TemporaryDirectory() as d:
            ts = Path(d) / "verify_model.ts"
            ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(root / "models" / "model.pt"),
                        meta_file=meta_file, config_file=config, bundle_root=str(root))
            exported = torch.jit.load(str(ts))
            if not (root / "models" / "model.ts").is_file():
                return "models/model.pt exported (no models/model.ts shipped)"
            shipped = torch.jit.load(str(root / "models" / "model.ts"))
            x = _spatial_input(json.loads(Path(meta_file).read_text()))
            with torch.no_grad():
                torch.testing.assert_close(shipped(x), exported(x), rtol=1e-4, atol=1e-4)
        return "models/model.pt exports; models/model.ts gives the same output"

    def properties():
        wf = ConfigWorkflow(config_file=config, meta_file=meta_file, logging_file=False, workflow_type="infer",
                            bundle_root=str(root))
        wf.initialize()
        missing = wf.check_properties()
        if missing:
            raise ZooError(f"inference.json lacks MONAI's inference properties {missing}")
        return "MONAI's inference properties present"

    def loads():
        net = load(name=root.name, bundle_dir=str(root.parent), workflow_type="inference", device="cpu",
                   progress=False)
        want = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
        have = net.state_dict()
        if set(want) != set(have) or any(not torch.equal(have[k], want[k]) for k in want):
            raise ZooError("monai.bundle.load built a network whose weights differ from models/model.pt")
        return f"{type(net).__name__} with every weight of models/model.pt"

    run("large files", large)
    run("required files", required)
    run("version in changelog", changelog)
    run("metadata", metadata)
    run("file sizes", sizes)
    if all(c.ok for c in checks):  # the rest build the network from the configs and weights checked above
        run("verify_net_in_out", net_in_out)
        run("ckpt_export", export)
        run("inference properties", properties)
        run("monai.bundle.load", loads)
    return checks


# --- index ----------------------------------------------------------------------------------------------------

def _zip_metadata(zip_path: Path) -> tuple[str, dict]:
    with zipfile.ZipFile(zip_path) as z:
        metas = [n for n in z.namelist() if n.count("/") == 2 and n.endswith("/configs/metadata.json")]
        if len(metas) != 1:
            raise ZooError(f"{zip_path}: expected one <name>/configs/metadata.json, found {len(metas)}")
        return metas[0].split("/")[0], json.loads(z.read(metas[0]))


def index(zoo_dir, base_url: str = "") -> Path:
    """Write ``zoo_dir/model_info.json`` for the ``<name>_v<version>.zip`` files in ``zoo_dir`` (the model
    zoo's format: key ``<name>_v<version>``, SHA-1 ``checksum`` of the zip, ``source`` its URL:
    ``<base_url>/<zip>``, or the zip's name relative to model_info.json without ``base_url``)."""
    from .utils import atomic_write_json

    zoo_dir = Path(zoo_dir)
    info = {}
    for z in sorted(zoo_dir.glob("*_v*.zip")):
        name, meta = _zip_metadata(z)
        key = f"{name}_v{meta['version']}"
        if z.name != f"{key}.zip":
            raise ZooError(f"{z}: holds {name} version {meta['version']}; expected the file name {key}.zip")
        info[key] = {"version": meta["version"], "checksum": file_hash(z, "sha1"),
                     "source": f"{base_url.rstrip('/')}/{z.name}" if base_url else z.name}
    if not info:
        raise ZooError(f"{zoo_dir}: no <name>_v<version>.zip; expected the output of `medssl zoo package`")
    return atomic_write_json(info, zoo_dir / MODEL_INFO)


# --- install --------------------------------------------------------------------------------------------------

def read_index(zoo: str) -> dict:
    """model_info.json of a zoo: a folder, a URL of the folder, or the file / its URL itself."""
    src = zoo if str(zoo).endswith(".json") else _join(str(zoo), MODEL_INFO)
    try:
        if _is_url(src):
            with urllib.request.urlopen(src, timeout=60) as r:  # noqa: S310
                return json.loads(r.read())
        return json.loads(Path(src).read_text())
    except (OSError, ValueError) as e:
        raise ZooError(f"{src}: no readable model_info.json ({e}); expected `medssl zoo index` output") from None


def _safe_extract(zip_path: Path, dest: Path, name: str) -> Path:
    """Extract the zip into ``dest`` after checking every member: inside ``name/``, no absolute path, no
    ``..``, no link. Nothing is written when one member fails."""
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for m in members:
            _safe_member(dest, m.filename)
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise ZooError(f"{zip_path}: member {m.filename!r} is a symbolic link; refused")
            if PurePosixPath(m.filename).parts[0] != name:
                raise ZooError(f"{zip_path}: member {m.filename!r} is outside the base folder {name}/")
        z.extractall(dest)
    return dest / name


def install(name: str, zoo: str, bundle_dir, version: str = "", force: bool = False) -> Path:
    """Install bundle ``name`` (its latest version, or ``version``) from ``zoo`` into ``bundle_dir/name``."""
    info = read_index(zoo)
    versions = {k[len(name) + 2:]: v for k, v in info.items() if k.startswith(f"{name}_v")}
    if not versions:
        known = sorted({k.rsplit("_v", 1)[0] for k in info})
        raise ZooError(f"{zoo}: no bundle {name!r}; the zoo has {', '.join(known) or 'none'}")
    if not version:
        version = max(versions, key=lambda v: (_version_tuple(v) is not None, _version_tuple(v) or v))
    if version not in versions:
        raise ZooError(f"{zoo}: no version {version!r} of {name}; it has {sorted(versions)}")
    entry = versions[version]
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / name
    if target.exists() and not force:
        raise ZooError(f"{target}: exists; remove it or pass --force to replace it")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.install.", dir=bundle_dir))
    try:
        zip_path = tmp / f"{name}_v{version}.zip"
        _fetch(_join(str(zoo) if not str(zoo).endswith(".json") else str(zoo).rsplit("/", 1)[0],
                     entry["source"]), zip_path)
        if entry.get("checksum"):
            hash_type = entry.get("hash_type") or {32: "md5", 40: "sha1", 64: "sha256"}.get(len(entry["checksum"]),
                                                                                             "sha1")
            got = file_hash(zip_path, hash_type)
            if got != entry["checksum"]:
                raise ZooError(f"{entry['source']}: {hash_type} {got} does not match model_info.json "
                               f"({entry['checksum']}); the download is corrupt or was replaced")
        try:
            root = _safe_extract(zip_path, tmp / "x", name)
        except zipfile.BadZipFile as e:
            raise ZooError(f"{entry['source']}: not a zip ({e})") from None
        zoo_base = str(zoo).rsplit("/", 1)[0] if str(zoo).endswith(".json") else str(zoo)
        fetch_large_files(root, zoo_base)
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise ZooError(f"{name} v{version}: necessary file(s) {', '.join(missing)} missing from the bundle")
        problems = metadata_problems(root)
        if problems:
            raise ZooError(f"{name} v{version}: " + "; ".join(problems))
        if target.exists():  # --force: the old copy goes with the temporary folder
            os.replace(target, tmp / "old")
        os.replace(root, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
