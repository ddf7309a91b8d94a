"""`medssl zoo`: package every bundle in the MONAI model zoo's layout, verify it with `medssl zoo verify` and with
the model zoo's own offline checks, index the folder, serve it over http on 127.0.0.1, install each bundle with
`medssl zoo install` and with `python -m monai.bundle download --url`, and compare inference from the installed
copy with inference from the source tree. Bad input (a weight or zip whose hash does not match, a bundle
without LICENSE, a wrong monai_version, no network_data_format, a zip path escaping the target) is refused
with nothing installed.

Weights: semi_cml's come from a real tiny training run (`python -m monai.bundle run` train, 1 epoch of 2 steps,
small channels: the path from a real run, its run.json settings and its model_<modality>.pt); the other four
bundles get *seeded untrained* network state dicts in a fake run folder (model.pt + run.json), which is what
packaging needs to wire a run into a bundle (dfr_barlow's records channel_attention false, so the packaged
inference.json must take the run's settings for its weights to load)."""

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BRATS, NUCLEI, TINY, bundle_runner

BUNDLES = ["context_restoration", "slem", "semi_cml", "cluster_resupervision", "dfr_barlow"]
FAKE_SETTINGS = {"dfr_barlow": {"channel_attention": False}}
SMALL_FILES = "slem"  # packaged with a 1 MB limit: its weights stay out of the zip and come from large_files.yml
TEMPLATE = ("Model Overview", "Data", "Training configuration", "Performance", "Commands", "System configuration",
            "Limitations", "References", "License")


def _fake_run(bundle: str, run: Path, seed: int) -> Path:
    """A run folder with a seeded untrained network (model.pt) and a run.json recording ``FAKE_SETTINGS``."""
    from monai.bundle import ConfigParser

    from medssl.bundles import bundle_path

    settings = FAKE_SETTINGS.get(bundle, {})
    parser = ConfigParser()
    parser.read_config(str(bundle_path(bundle) / "configs" / "inference.json"))
    for k, v in settings.items():
        parser[k] = v
    torch.manual_seed(seed)
    run.mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "model.pt")
    (run / "run.json").write_text(json.dumps({"bundle": bundle, "stage": "train", "overrides": settings,
                                              "settings": settings}))
    return run


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every bundle packaged into one zoo folder served on 127.0.0.1 and indexed; the runs; small data sets."""
    from medssl.zoo import index, package

    root = tmp_path_factory.mktemp("zoo")
    folder = root / "zoo"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    _, _, monai_run = bundle_runner("semi_cml")
    runs = {"semi_cml": root / "runs" / "semi_cml"}
    monai_run("train", *TINY, "--val_interval", 1, "--channels", "[8,16,32,64,128]", "--ckpt_dir", runs["semi_cml"])
    for i, b in enumerate(b for b in BUNDLES if b != "semi_cml"):
        runs[b] = _fake_run(b, root / "runs" / b, seed=i)
    for b in BUNDLES:
        package(b, folder, runs[b], base_url=url, max_file_mb=1 if b == SMALL_FILES else 25)
    index(folder, base_url=url)
    data = {"brats": root / "brats", "nuclei": root / "nuclei"}
    case = sorted(p for p in BRATS.iterdir() if p.is_dir())[0]
    shutil.copytree(case, data["brats"] / case.name)
    image = sorted((NUCLEI / "images").glob("*.png"))[0]
    (data["nuclei"] / "images").mkdir(parents=True)
    shutil.copy(image, data["nuclei"] / "images" / image.name)
    yield {"root": root, "folder": folder, "url": url, "runs": runs, "data": data}
    server.shutdown()


def test_every_bundle_packages_and_passes_medssl_and_the_model_zoo_checks(zoo, medssl):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    from medssl import SCHEMA_FILE, __version__

    for b in BUNDLES:
        root = zoo["folder"] / b
        r = medssl("zoo", "verify", root)
        lines = [x for x in r.stdout.splitlines() if x.startswith(("PASS", "FAIL"))]  # MONAI's log lines aside
        assert r.returncode == 0 and len(lines) == 9 and all(x.startswith("PASS") for x in lines), r.stdout + r.stderr
        # the model zoo CI's own checks (ci/verify_bundle.py) that run offline, at their defaults (n=1)
        meta, config = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
        verify_metadata(meta_file=meta, filepath=str(SCHEMA_FILE))
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(root))
        ckpt_export(net_id="network_def", filepath=str(zoo["root"] / f"{b}_verify.ts"),
                    ckpt_file=str(root / "models" / "model.pt"), meta_file=meta, config_file=config,
                    bundle_root=str(root))
        m = json.loads(Path(meta).read_text())
        assert m["required_packages_version"]["medssl"] == __version__ and m["version"] in m["changelog"]
        assert m["eval_metrics"]["mean_dice"] > 0 and {"monai_version", "pytorch_version", "numpy_version"} <= set(m)
        readme = (root / "docs" / "README.md").read_text()
        assert all(f"## {s}" in readme for s in TEMPLATE), b
        assert (root / "docs" / "data_license.txt").is_file() and (root / "LICENSE").is_file()
        with zipfile.ZipFile(zoo["folder"] / f"{b}_v{m['version']}.zip") as z:
            names = set(z.namelist())
        assert {f"{b}/configs/metadata.json", f"{b}/LICENSE", f"{b}/large_files.yml"} <= names
        assert (f"{b}/models/model.pt" in names) == (b != SMALL_FILES)  # over the limit: fetched, not zipped
    # the run's settings are in the packaged inference.json: a real run's channels, a fake run's switch
    cml = json.loads((zoo["folder"] / "semi_cml" / "configs" / "inference.json").read_text())
    assert cml["channels"] == [8, 16, 32, 64, 128] and cml["modality"] == "flair"
    packaged, trained = (torch.load(f) for f in (zoo["folder"] / "semi_cml" / "models" / "model.pt",
                                                 zoo["runs"]["semi_cml"] / "model_flair.pt"))
    assert packaged.keys() == trained.keys() and all(torch.equal(packaged[k], trained[k]) for k in packaged)
    dfr = json.loads((zoo["folder"] / "dfr_barlow" / "configs" / "inference.json").read_text())
    assert dfr["channel_attention"] is False


def _redirect_github(monkeypatch, url: str):
    """Send MONAI's github-source requests (raw.githubusercontent.com for model_info.json, github.com release
    assets for zips) to the local server: the machine is offline; what is tested is that MONAI's own code
    reads our model_info.json and zip names. (``requests``, which MONAI uses for model_info.json, is not
    installed here: its ``get`` is given by urllib, the transport only.)"""
    import types
    import urllib.request

    import monai.apps.utils as apps_utils
    import monai.bundle.scripts as scripts

    def urllib_get(u, *args, **kwargs):
        with urllib.request.urlopen(u, timeout=60) as r:
            return types.SimpleNamespace(text=r.read().decode(), raise_for_status=lambda: None)

    if not scripts.has_requests:
        monkeypatch.setattr(scripts, "has_requests", True)
        monkeypatch.setattr(scripts, "requests", types.SimpleNamespace(get=urllib_get))

    def local(u: str) -> str:
        for prefix in ("https://raw.githubusercontent.com/medssl/zoo/local/models/",
                       "https://github.com/medssl/zoo/releases/download/local/"):
            if u.startswith(prefix):
                return f"{url}/{u[len(prefix):]}"
        raise AssertionError(f"unexpected network access: {u}")

    get, retrieve = scripts.requests.get, apps_utils.urlretrieve
    monkeypatch.setattr(scripts.requests, "get", lambda u, *a, **k: get(local(u), *a, **k))
    monkeypatch.setattr(apps_utils, "urlretrieve", lambda u, *a, **k: retrieve(local(u), *a, **k))


def test_index_is_read_by_monai_get_all_bundles_list_and_github_download(zoo, monkeypatch, tmp_path):
    from monai.bundle import download, get_all_bundles_list

    info = json.loads((zoo["folder"] / "model_info.json").read_text())
    versions = {b: json.loads((zoo["folder"] / b / "configs" / "metadata.json").read_text())["version"]
                for b in BUNDLES}
    assert set(info) == {f"{b}_v{v}" for b, v in versions.items()}
    assert all(e["source"] == f"{zoo['url']}/{k}.zip" and len(e["checksum"]) == 40 for k, e in info.items())
    _redirect_github(monkeypatch, zoo["url"])
    assert sorted(get_all_bundles_list(repo="medssl/zoo", tag="local")) == sorted(versions.items())
    download(name="cluster_resupervision", source="github", repo="medssl/zoo/local", bundle_dir=tmp_path,
             progress=False)  # no version: MONAI takes the latest from our model_info.json
    got = tmp_path / "cluster_resupervision"
    assert (got / "configs" / "metadata.json").read_bytes() == \
        (zoo["folder"] / "cluster_resupervision" / "configs" / "metadata.json").read_bytes()


def _outputs(folder: Path) -> dict:
    import nibabel as nib
    from PIL import Image

    out = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = np.asarray(nib.load(p).dataobj) if p.name.endswith(".nii.gz") else np.asarray(Image.open(p))
    return out


def test_installed_bundles_infer_as_the_source_tree(zoo, medssl, tmp_path):
    from monai.bundle import run

    installed, downloaded = tmp_path / "medssl", tmp_path / "monai"
    procs = {}
    for b in BUNDLES:  # MONAI's own downloader, all five at once (url source; then, where the zip left weights
        # out, MONAI's download_large_files)
        key = json.loads((zoo["folder"] / "model_info.json").read_text())
        name = next(k for k in key if k.startswith(f"{b}_v"))
        procs[b] = subprocess.Popen(
            [sys.executable, "-c", "import sys, subprocess; r = subprocess.run([sys.executable, '-m', 'monai.bundle', "
             "'download', '--name', sys.argv[1], '--url', sys.argv[2], '--bundle_dir', sys.argv[3]]); "
             "r.returncode or sys.argv[5] == 'no' or subprocess.run([sys.executable, '-m', 'monai.bundle', "
             "'download_large_files', '--bundle_path', sys.argv[4]], check=True)",
             name, f"{zoo['url']}/{name}.zip", downloaded,
             downloaded / b, "yes" if b == SMALL_FILES else "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for b in BUNDLES:
        r = medssl("zoo", "install", b, "--zoo", zoo["url"], "--bundle_dir", installed)
        assert r.returncode == 0, r.stderr
        assert (installed / b / "models" / "model.pt").is_file()
    for b, p in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
        files = sorted(f.relative_to(downloaded / b) for f in (downloaded / b).rglob("*") if f.is_file())
        assert files == sorted(f.relative_to(installed / b) for f in (installed / b).rglob("*") if f.is_file())
        assert all((downloaded / b / f).read_bytes() == (installed / b / f).read_bytes() for f in files), b
    assert not [p for p in installed.iterdir() if p.name.startswith(".")]  # no temporary folder left
    for b in BUNDLES:
        data = zoo["data"]["nuclei" if b == "dfr_barlow" else "brats"]
        src, inst = tmp_path / "out" / b / "source", tmp_path / "out" / b / "installed"
        r = medssl("run", b, "inference", "--ckpt_dir", zoo["runs"][b], "--dataset_dir", data, "--output_dir", src)
        assert r.returncode == 0, r.stderr
        root = installed / b
        run(config_file=str(root / "configs" / "inference.json"), meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"), bundle_root=str(root), dataset_dir=str(data),
            output_dir=str(inst))
        a, c = _outputs(src), _outputs(inst)
        assert a and a.keys() == c.keys(), (b, a.keys(), c.keys())
        assert all(np.array_equal(a[k], c[k]) for k in a), b


# --- bad input: refused with one message, nothing installed ---------------------------------------------------

def _rezip(src: Path, dest: Path, edit) -> None:
    """Copy zip ``src`` to ``dest`` with ``edit({member: bytes})`` applied to its members."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(dest, "w") as z:
        for n, data in edit(members).items():
            z.writestr(n, data)


def _bad_zoo(zoo, tmp_path, edit, bundle="cluster_resupervision") -> Path:
    """A zoo folder holding ``bundle``'s packaged zip edited by ``edit``, indexed (relative sources)."""
    from medssl.zoo import index

    folder = tmp_path / "bad_zoo"
    folder.mkdir()
    src = next(zoo["folder"].glob(f"{bundle}_v*.zip"))
    _rezip(src, folder / src.name, edit)
    index(folder)
    return folder


def _meta_edit(change):
    def edit(members):
        key = next(n for n in members if n.endswith("/configs/metadata.json"))
        meta = json.loads(members[key])
        change(meta)
        return {**members, key: json.dumps(meta).encode()}

    return edit


@pytest.mark.parametrize("case,edit,words", [
    ("no_license", lambda m: {n: d for n, d in m.items() if not n.endswith("/LICENSE")}, "LICENSE missing"),
    ("monai_version", _meta_edit(lambda m: m.update(monai_version="99.0.0")), "monai_version '99.0.0' is newer"),
    ("no_network_data_format", _meta_edit(lambda m: m.pop("network_data_format")), "no network_data_format"),
    ("escaping_path", lambda m: {**m, "cluster_resupervision/../../evil.txt": b"x"}, "escapes the bundle folder"),
])
def test_a_bad_bundle_is_refused_and_nothing_is_installed(zoo, medssl, tmp_path, case, edit, words):
    folder = _bad_zoo(zoo, tmp_path, edit)
    target = tmp_path / "bundles"
    r = medssl("zoo", "install", "cluster_resupervision", "--zoo", folder, "--bundle_dir", target)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert list(target.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
    if case in ("no_license", "monai_version", "no_network_data_format"):  # verify says the same, one line
        with zipfile.ZipFile(next(folder.glob("*.zip"))) as z:
            z.extractall(tmp_path / "unzipped")
        root = tmp_path / "unzipped" / "cluster_resupervision"
        shutil.copytree(zoo["folder"] / "cluster_resupervision" / "models", root / "models", dirs_exist_ok=True)
        r = medssl("zoo", "verify", root)
        assert r.returncode == 1 and any(x.startswith("FAIL") and words in x for x in r.stdout.splitlines()), r.stdout


def test_a_weight_or_zip_whose_hash_does_not_match_is_refused(zoo, medssl, tmp_path):
    from medssl.zoo import index, package

    folder = tmp_path / "zoo"
    package("cluster_resupervision", folder, zoo["runs"]["cluster_resupervision"], max_file_mb=0)  # weights fetched
    index(folder)
    target = tmp_path / "bundles"
    weight = folder / "cluster_resupervision" / "models" / "model.pt"
    good = weight.read_bytes()
    weight.write_bytes(good[:-8] + b"tampered")
    r = medssl("zoo", "install", "cluster_resupervision", "--zoo", folder, "--bundle_dir", target)
    assert r.returncode == 2 and "models/model.pt: sha256" in r.stderr and "does not match large_files.yml" in r.stderr
    assert list(target.iterdir()) == []
    weight.write_bytes(good)
    z = next(folder.glob("*.zip"))
    z.write_bytes(z.read_bytes() + b"\0")  # the zip no longer has model_info.json's checksum
    r = medssl("zoo", "install", "cluster_resupervision", "--zoo", folder, "--bundle_dir", target)
    assert r.returncode == 2 and "does not match model_info.json" in r.stderr, r.stderr
    assert list(target.iterdir()) == []
    index(folder)  # re-indexed: installs; a second install without --force is refused, the first kept
    assert medssl("zoo", "install", "cluster_resupervision", "--zoo", folder, "--bundle_dir", target).returncode == 0
    assert (target / "cluster_resupervision" / "models" / "model.pt").read_bytes() == good
    r = medssl("zoo", "install", "cluster_resupervision", "--zoo", folder, "--bundle_dir", target)
    assert r.returncode == 2 and "exists" in r.stderr
