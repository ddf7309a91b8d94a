"""The package installs for real: `python -m build` makes an sdist and a wheel (built from the sdist) that carry the
five bundles, and a non-editable install of the wheel runs `medssl bundles`, `medssl run` and
`python -m monai.bundle run` with no checkout in sight (issue 16)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, monai_command

pytestmark = pytest.mark.slow


def test_wheel_carries_the_bundles_and_runs_without_a_checkout(tmp_path, nuclei_copy):
    pytest.importorskip("build", reason="the `build` package (test extra) is not installed")
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next(dist.glob("medssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    bundles = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
    for b in bundles:
        for f in ("configs/metadata.json", "configs/train.json", "configs/inference.json", "docs/README.md", "LICENSE"):
            assert f"medssl/_bundles/{b}/{f}" in names, (b, f)
    assert not [n for n in names if n.endswith((".pt", ".ts"))], "weights must not ride in the wheel"

    site = tmp_path / "site"  # a non-editable install, found before the editable checkout through PYTHONPATH
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("MEDSSL_BUNDLES_DIR", None)

    def run(*args, cwd=away):
        out = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    where = json.loads(run("-c", "import json, medssl, medssl.bundles as b; "
                                 "print(json.dumps([medssl.__file__, str(b.bundles_dir())]))"))
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "medssl" / "_bundles"
    listed = run("-m", "medssl.cli", "bundles")
    assert all(b in listed for b in bundles)
    data, ckpt = nuclei_copy(12), tmp_path / "run"
    run("-m", "medssl.cli", "run", "dfr_barlow", "train", *TINY, "--val_interval", 1, "--init", "baseline", "--dataset_dir", data,
        "--ckpt_dir", ckpt)
    assert (ckpt / "model.pt").is_file() and json.loads((ckpt / "run.json").read_text())["bundle"] == "dfr_barlow"
    installed = site / "medssl" / "_bundles" / "dfr_barlow"
    run(*monai_command("evaluate", "--dataset_dir", data, "--ckpt_dir", ckpt, "--output_dir", tmp_path / "eval")[1:],
        cwd=installed)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_cases"] >= 1
