"""MONAI Label integration (issue 15, serving): the bundles through MONAI Label's own task classes, and a real
``medssl label serve`` server on 127.0.0.1 over studies prepared from BraTS cases of ../shared/data.

The served weights are seeded, untrained networks' state dicts saved as model.pt files in run folders
(``--weights name=DIR``): these tests check the wiring (shapes, affines, label values, HTTP answers), not
segmentation quality. Needs the ``label`` extra (monailabel 0.8.5); skipped without it."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="MONAI Label is not installed (pip install -e '.[label]'; .ci/run does)")

import nibabel as nib  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

import medssl.label as L  # noqa: E402
from medssl.bundles import bundle_path  # noqa: E402
from medssl.data import BRATS_MODALITIES  # noqa: E402
from medssl.utils import data_root  # noqa: E402

BRATS = data_root() / "brats18_2mm"
NAMES = list(L.SERVING)


def _cases(n):
    return sorted(p.name for p in BRATS.iterdir() if p.is_dir())[:n]


def _seeded_weights(root: Path) -> dict:
    """A run folder per bundle with a seeded untrained network_def's state dict (semi_cml: one per modality)."""
    out = {}
    for name in NAMES:
        parser = ConfigParser()
        parser.read_config(str(bundle_path(name) / "configs" / "inference.json"))
        for k, v in L.SERVING[name]["brats"].get("settings", {}).items():
            parser[k] = v
        torch.manual_seed(0)
        state = parser.get_parsed_content("network_def").state_dict()
        run = root / name
        run.mkdir(parents=True)
        for f in (["model_flair.pt", "model_t2.pt"] if name == "semi_cml" else ["model.pt"]):
            torch.save(state, run / f)
        out[name] = run
    return out


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "datastore" not in p.name and ".lock" not in p.name}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    data = root / "data"
    for case in _cases(4):
        shutil.copytree(BRATS / case, data / case)
    unlabelled, still_unlabelled = _cases(4)[2:]
    for case in (unlabelled, still_unlabelled):  # studies without a label (the PUT test labels the first)
        (data / case / f"{case}_seg.nii.gz").unlink()
    return {"root": root, "data": data, "weights": _seeded_weights(root / "runs"), "unlabelled": unlabelled,
            "still_unlabelled": still_unlabelled}


def test_prepare_studies_keeps_originals_and_is_idempotent(work, tmp_path):
    before = _digest(work["data"])
    report = L.prepare_studies(work["data"], tmp_path / "studies")
    assert report["studies"] == _cases(4) and work["unlabelled"] not in report["labels"] and len(report["labels"]) == 2
    case = _cases(1)[0]
    study = nib.load(str(tmp_path / "studies" / f"{case}.nii.gz"))
    flair = nib.load(str(BRATS / case / f"{case}_flair.nii.gz"))
    assert study.shape == flair.shape + (4,)
    np.testing.assert_allclose(study.affine, flair.affine)
    for i, m in enumerate(BRATS_MODALITIES):  # channel order of BRATS_MODALITIES, values kept
        np.testing.assert_array_equal(np.asarray(study.dataobj[..., i]),
                                      np.asarray(nib.load(str(BRATS / case / f"{case}_{m}.nii.gz")).dataobj))
    assert (tmp_path / "studies" / "labels" / "final" / f"{case}.nii.gz").read_bytes() == \
        (BRATS / case / f"{case}_seg.nii.gz").read_bytes()
    first = _digest(tmp_path / "studies")
    stamp = (tmp_path / "studies" / f"{case}.nii.gz").stat().st_mtime_ns
    L.prepare_studies(work["data"], tmp_path / "studies")
    assert _digest(tmp_path / "studies") == first
    assert (tmp_path / "studies" / f"{case}.nii.gz").stat().st_mtime_ns == stamp  # not rewritten
    assert _digest(work["data"]) == before
    with pytest.raises(ValueError, match="inside the data folder"):
        L.prepare_studies(work["data"], work["data"] / "studies")


def test_bundles_load_through_monailabel_task_classes(work, tmp_path):
    """MONAI Label's own BundleInferTask / BundleTrainTask accept every bundle: image key from the first input,
    labels from channel_def, network AND network_def, dropout injected into network_def (epistemic scoring),
    and the train ids MONAI Label overrides."""
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask

    record = L.materialise_bundles(NAMES, tmp_path / "model", "brats", work["weights"])
    assert all(r["served"] for r in record.values()), record
    for name in NAMES:
        path = str(tmp_path / "model" / name)
        task = BundleInferTask(path, {})
        assert task.is_valid() and task.key_image == "image" and task.labels, name
        assert BundleInferTask(path, {}, dropout=0.2, train_mode=True, skip_writer=True).is_valid(), name
        config = task.bundle_config
        assert config.get_parsed_content("network_def").state_dict().keys() == \
            torch.load(Path(path, "models", "model.pt"), weights_only=True).keys(), name
        assert config.get("network") is not None, name
        train = BundleTrainTask(path, {})
        assert train.is_valid(), name
        for key in ("train#trainer#max_epochs", "train#dataset#data", "train#handlers", "validate#dataset#data",
                    "network", "network_def", "device", "bundle_root"):
            assert train.bundle_config.get(key) is not None, (name, key)
    # a nuclei-only model on BraTS studies is not served, with the reason; dfr_barlow switches to BraTS slices
    nuclei_run = tmp_path / "nuclei_run"
    nuclei_run.mkdir()
    (nuclei_run / "run.json").write_text(json.dumps({"bundle": "dfr_barlow", "settings": {"dataset_name": "dsb2018_nuclei"}}))
    reason = L.materialise_bundle("dfr_barlow", tmp_path / "x", "brats", nuclei_run)
    assert "dsb2018_nuclei" in reason and "cannot segment" in reason
    assert "serves" in L.materialise_bundle("slem", tmp_path / "y", "nuclei")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cmd, log_path: Path, request, procs: list | None = None) -> tuple[str, dict]:
    """Run ``cmd`` (a MONAI Label server on 127.0.0.1, ``{port}`` in it replaced by a free port) until GET /info/
    answers; it is stopped when the test (or module) ends. Returns (url, info); ``procs`` gets the process."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")
    proc = subprocess.Popen([str(c).replace("{port}", str(port)) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    request.addfinalizer(stop)
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            info = requests.get(f"{url}/info/", timeout=5)
            if info.status_code == 200:
                return url, info.json()
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def server(work, request):
    out = work["root"] / "served"
    weights = ",".join(f"{n}={p}" for n, p in work["weights"].items())
    procs = []
    url, info = _start_server([sys.executable, "-m", "medssl.cli", "label", "serve", "--studies", str(work["data"]),
                               "--out", str(out), "--port", "{port}", "--weights", weights],
                              work["root"] / "server.log", request, procs)
    return {"url": url, "studies": out / "studies", "info": info, "proc": procs[0], "log": work["root"] / "server.log"}


def test_info_lists_the_five_models(server):
    info = server["info"]
    assert sorted(info["models"]) == sorted(NAMES)
    assert info["medssl"]["not_served"] == {} and info["medssl"]["kind"] == "brats"
    assert info["models"]["slem"]["labels"] == L.BRATS_LABELS and info["models"]["semi_cml"]["dimension"] == 3
    assert set(info["trainers"]) == set(NAMES)


def test_infer_each_bundle_returns_a_label_volume_like_its_input(server, tmp_path):
    case = _cases(1)[0]
    study = nib.load(str(server["studies"] / f"{case}.nii.gz"))
    seconds = {}
    for name in NAMES:
        for call in ("first", "second"):  # the first call builds the network and loads its weights
            start = time.time()
            r = requests.post(f"{server['url']}/infer/{name}", params={"image": case, "output": "image"}, timeout=300)
            seconds[name, call] = time.time() - start
            assert r.status_code == 200, (name, r.text[:500])
        (tmp_path / f"{name}.nii.gz").write_bytes(r.content)
        label = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert label.shape == study.shape[:3], name
        np.testing.assert_allclose(label.affine, study.affine, atol=1e-4, err_msg=name)
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert values <= {0, *L.SERVING[name]["brats"]["labels"].values()}, (name, values)
    print("\nMONAI Label infer seconds per bundle (CPU, " + str(study.shape) + "): "
          + ", ".join(f"{n} {seconds[n, 'first']:.2f} (first call) {seconds[n, 'second']:.2f} (next)" for n in NAMES))


def test_bad_input_is_a_4xx_and_leaves_the_datastore_alone(server, tmp_path):
    from PIL import Image

    url, studies = server["url"], server["studies"]
    before = _digest(studies)
    r = requests.post(f"{url}/infer/slem", params={"image": "no_such_case"}, timeout=60)
    assert r.status_code == 404 and "no_such_case" in r.json()["detail"]
    r = requests.post(f"{url}/infer/no_such_model", params={"image": _cases(1)[0]}, timeout=60)
    assert r.status_code == 404 and "no_such_model" in r.json()["detail"]
    outside = tmp_path / "outside.nii.gz"  # a readable study outside the datastore: never read by path
    shutil.copyfile(studies / f"{_cases(1)[0]}.nii.gz", outside)
    for path in ("/etc/passwd", str(outside)):
        r = requests.post(f"{url}/infer/slem", params={"image": path}, timeout=60)
        assert r.status_code == 404 and "expected the id of one of its images" in r.json()["detail"], path
    r = requests.post(f"{url}/activelearning/no_such_strategy", json={}, timeout=60)
    assert r.status_code == 404 and "no_such_strategy" in r.json()["detail"]
    for _ in range(2):  # the same answer every time
        with open(studies / f"{_cases(1)[0]}.nii.gz", "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": "no_such_case", "tag": "final"},
                             files={"label": ("label.nii.gz", f)}, timeout=60)
        assert r.status_code == 404 and "no_such_case" in r.json()["detail"], r.text
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(png)
    with open(png, "rb") as f:
        r = requests.post(f"{url}/infer/context_restoration", files={"file": ("slice.png", f)}, timeout=60)
    assert r.status_code == 422 and "2-D picture" in r.json()["detail"] and "4 BraTS modalities" in r.json()["detail"]
    case = _cases(1)[0]
    study = nib.load(str(studies / f"{case}.nii.gz"))
    three = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(study.dataobj)[..., :3], study.affine), str(three))
    for name in ("cluster_resupervision", "semi_cml"):
        with open(three, "rb") as f:
            r = requests.post(f"{url}/infer/{name}", files={"file": ("three.nii.gz", f)}, timeout=60)
        assert r.status_code == 422 and "missing modalities" in r.json()["detail"], (name, r.text)
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200  # still up
    assert _digest(studies) == before


def test_active_learning_serves_an_unlabelled_study_by_modality_disagreement(server, work):
    """POST /activelearning/modality_disagreement: one of the unlabelled studies, with the Dice between semi_cml's
    two modality networks that ranked it (which one is meaningless with untrained weights; the ranking itself
    is tested with networks of known behaviour in test_label_loop.py)."""
    r = requests.post(f"{server['url']}/activelearning/modality_disagreement", json={}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    chosen = r.json()
    assert chosen["id"] in (work["unlabelled"], work["still_unlabelled"]) and 0.0 <= chosen["modality_dice"] <= 1.0


def test_put_label_lands_in_labels_final(server, work):
    case = work["unlabelled"]
    path = server["studies"] / "labels" / "final" / f"{case}.nii.gz"
    assert not path.exists()
    study = nib.load(str(server["studies"] / f"{case}.nii.gz"))
    label = np.zeros(study.shape[:3], np.uint8)
    label[20:30, 20:30, 20:30] = 2
    upload = work["root"] / "upload.nii.gz"
    nib.save(nib.Nifti1Image(label, study.affine), str(upload))
    with open(upload, "rb") as f:
        r = requests.put(f"{server['url']}/datastore/label", params={"image": case, "tag": "final"},
                         files={"label": ("upload.nii.gz", f)}, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), label)
    listed = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in json.dumps(listed["objects"][case]["labels"])


def test_train_uses_labelled_and_unlabelled_studies_and_the_next_infer_uses_it(server, work):
    """POST /train/semi_cml (one short epoch, run synchronously): medssl's train task writes the datastore as
    BraTS case folders, unlabelled studies included, runs semi_cml's own train stage on them (its datalist
    holds the still-unlabelled study as an unlabelled case), and publishes the new weights; the next
    /infer/ loads them (MONAI Label reloads a model file that changed)."""
    served = work["root"] / "served" / "model" / "semi_cml"
    before = torch.load(served / "models" / "model.pt", weights_only=True)
    r = requests.post(f"{server['url']}/train/semi_cml", params={"run_sync": True}, timeout=600,
                      json={"max_epochs": 1, "epoch_length": 2, "val_interval": 1, "device": "cpu"})
    assert r.status_code == 200, r.text[-2000:]
    runs = sorted((served / "monailabel" / "runs").iterdir())
    datalist = json.loads((runs[-1] / "datalist.json").read_text())
    unlabelled = sorted(c["case"] for c in datalist["training"] if not c.get("labelled", True))
    assert unlabelled == [work["still_unlabelled"]] and len(datalist["validation"]) == 1
    after = torch.load(served / "models" / "model.pt", weights_only=True)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
    for k, v in torch.load(runs[-1] / "train" / "model_flair.pt", weights_only=True).items():
        assert torch.equal(after[k], v)  # the served modality's own network
    case = _cases(1)[0]
    r = requests.post(f"{server['url']}/infer/semi_cml", params={"image": case, "output": "image"}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    log = (work["root"] / "server.log").read_text()
    assert "training on 3 labelled and 1 unlabelled studies" in log
    # a training that changes the network's size: its settings are published with the weights, and the running
    # server rebuilds the network from them (a strict load into the old network would fail)
    r = requests.post(f"{server['url']}/train/semi_cml", params={"run_sync": True}, timeout=600,
                      json={"max_epochs": 1, "epoch_length": 1, "val_interval": 1, "device": "cpu",
                            "channels": [8, 16, 32, 64, 128]})
    assert r.status_code == 200, r.text[-2000:]
    assert json.loads((served / "configs" / "inference.json").read_text())["channels"] == [8, 16, 32, 64, 128]
    r = requests.post(f"{server['url']}/infer/semi_cml", params={"image": case, "output": "image"}, timeout=300)
    assert r.status_code == 200, r.text[:500]


def test_dfr_barlow_serves_nuclei_pngs_in_process(tmp_path):
    """A nuclei folder (DSB layout) is served as 2-D PNG studies: dfr_barlow answers a PNG label map of the
    picture's size (a non-square one too); the BraTS-only bundles are listed as not served, with the reason;
    a NIfTI sent to the 2-D model is a 422."""
    from fastapi import HTTPException
    from PIL import Image

    from medssl.label.tasks import MedsslApp

    nuclei = data_root() / "dsb2018_nuclei"
    pictures = sorted((nuclei / "images").glob("*.png"))
    rect = next(p for p in pictures if Image.open(p).size[0] != Image.open(p).size[1])
    data = tmp_path / "data"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
        for p in (pictures[0], rect):
            shutil.copy(nuclei / sub / p.name, data / sub / p.name)
    report = L.prepare_studies(data, tmp_path / "studies")
    mask = np.asarray(Image.open(tmp_path / "studies" / "labels" / "final" / rect.name))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(data / "labels" / rect.name)) > 0)
    assert sorted(report["labels"]) == sorted({pictures[0].stem, rect.stem})
    parser = ConfigParser()
    parser.read_config(str(bundle_path("dfr_barlow") / "configs" / "inference.json"))
    torch.manual_seed(0)
    (tmp_path / "run").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "run" / "model.pt")
    L.materialise_bundles(["dfr_barlow", "slem"], tmp_path / "model", "nuclei", {"dfr_barlow": tmp_path / "run"})
    (tmp_path / "app").mkdir()  # MONAI Label writes logs into its app folder: a copy, as `serve` uses
    shutil.copyfile(L.APP_DIR / "main.py", tmp_path / "app" / "main.py")
    app = MedsslApp(str(tmp_path / "app"), str(tmp_path / "studies"),
                    {"models_dir": str(tmp_path / "model"), "kind": "nuclei", "bundles": "dfr_barlow,slem",
                     "skip_trainers": "true"})
    info = app.info()
    assert list(info["models"]) == ["dfr_barlow"] and "2-D image (PNG)" in info["medssl"]["not_served"]["slem"]
    result = app.infer({"model": "dfr_barlow", "image": rect.stem, "device": "cpu"})
    label = np.asarray(Image.open(result["file"]))
    assert label.shape == np.asarray(Image.open(rect)).shape[:2] and set(np.unique(label)) <= {0, 1}
    # an uploaded NIfTI: where MONAI Label's /infer/ endpoint writes an upload (a temp file), not a datastore id
    volume = Path(tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name)
    try:
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(volume))
        with pytest.raises(HTTPException) as e:
            app.infer({"model": "dfr_barlow", "image": str(volume), "device": "cpu"})
        assert e.value.status_code == 422 and "expects a 2-D image (PNG)" in e.value.detail
        outside = tmp_path / "volume.nii.gz"  # the same file elsewhere, by path: not in the datastore, never read
        shutil.copyfile(volume, outside)
        with pytest.raises(HTTPException) as e:
            app.infer({"model": "dfr_barlow", "image": str(outside), "device": "cpu"})
        assert e.value.status_code == 404
    finally:
        volume.unlink()


STOCK_APP = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"


@pytest.mark.skipif(not STOCK_APP.is_dir(), reason=f"MONAI Label's sample apps are not installed ({STOCK_APP})")
def test_install_into_monai_labels_stock_monaibundle_app_serves_the_bundles(work, tmp_path, request):
    """`medssl label install` into a copy of MONAI Label's own monaibundle sample app (as pip installs it), then
    that stock app's server (`monailabel start_server --conf models slem,semi_cml`): both bundles are listed and
    /infer/ returns a label volume with the study's shape and affine."""
    app = tmp_path / "monaibundle"
    shutil.copytree(STOCK_APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    names = ["slem", "semi_cml"]
    weights = ",".join(f"{n}={work['weights'][n]}" for n in names)
    done = subprocess.run([sys.executable, "-m", "medssl.cli", "label", "install", str(app), "--bundles", ",".join(names),
                           "--weights", weights], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    studies = tmp_path / "studies"
    L.prepare_studies(work["data"], studies)
    url, info = _start_server(L.monailabel_command() + ["start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
                                      "--port", "{port}", "--conf", "models", ",".join(names),
                                      # offline: local bundles without listing the online zoo, no SAM2 download
                                      "--conf", "zoo_source", "github", "--conf", "sam2", "false"],
                              tmp_path / "stock.log", request)
    assert set(names) <= set(info["models"]), info["models"].keys()
    case = _cases(1)[0]
    study = nib.load(str(studies / f"{case}.nii.gz"))
    for name in names:
        r = requests.post(f"{url}/infer/{name}", params={"image": case, "output": "image"}, timeout=300)
        assert r.status_code == 200, (name, r.text[:500])
        (tmp_path / f"{name}.nii.gz").write_bytes(r.content)
        label = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert label.shape == study.shape[:3], name
        np.testing.assert_allclose(label.affine, study.affine, atol=1e-4, err_msg=name)


def test_zz_sigterm_to_medssl_stops_the_server_and_frees_its_port(server):
    """Last in this module (it stops the module's server): SIGTERM to the `medssl label serve` process alone (a
    service manager's stop), not its process group, ends the MONAI Label child too and frees the port; the
    server said when it was ready, with its URL."""
    import socket

    proc, port = server["proc"], int(server["url"].rsplit(":", 1)[1])
    deadline = time.time() + 60  # the line comes from medssl's own poll of /info/ (every second)
    while f"ready at {server['url']}" not in server["log"].read_text():
        assert time.time() < deadline, server["log"].read_text()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.time() < deadline, "the MONAI Label child still holds the port"
        time.sleep(0.5)
