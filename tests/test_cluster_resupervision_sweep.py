"""The num_clusters sweep of cluster_resupervision (bundles/cluster_resupervision/benchmark.json "sweeps"): a
sweep over a config override, evaluated on the folds' VALIDATION slices (K is chosen there, never on test
slices), with Dice, under- and over-segmentation per K. Smoke budget, real BraTS cases."""

import json

import pytest
import torch

from medssl.apps import benchmark as bm
from medssl.bundles import bundle_path

pytestmark = pytest.mark.slow


def test_num_clusters_sweep_trains_each_k_and_scores_it_on_validation_slices(tmp_path, brats_copy, monkeypatch):
    spec = bm.load_spec("cluster_resupervision")
    sweep = spec.sweeps["num_clusters"]
    assert sweep["override"] == "num_clusters" and sweep["evaluate"] == {"eval_split": "validation"}
    default = json.loads((bundle_path("cluster_resupervision") / "configs" / "train.json").read_text())["num_clusters"]
    assert sorted(sweep["values"]) == sweep["values"] and default in sweep["values"]  # the default is a swept K
    spec.sweeps["num_clusters"] = {**sweep, "values": [2, 3], "fold": 1, "folds": 2}  # 2 values, 1 fold: seconds
    monkeypatch.setattr(bm, "load_spec", lambda bundle: spec)
    out = tmp_path / "sweep"
    res = bm.run_sweep("cluster_resupervision", str(brats_copy(5)), "num_clusters", budget="smoke", out=str(out),
                       progress=False, logging_file=False)
    assert [r["value"] for r in res["rows"]] == [2, 3] and {r["fold"] for r in res["rows"]} == {1}
    datalist = json.loads((out / "fold1" / "datalist_f1.json").read_text())
    validation = {c["case"] for c in datalist["validation"]}
    for row in res["rows"]:
        assert row["split"] == "validation"
        assert {c.split("/")[0] for c in row["cases"]} == validation  # scored on the validation cases only
        run_dir = out / "fold1" / "f1" / row["variant"]
        ckpt = torch.load(run_dir / "train_checkpoint.pt", map_location="cpu", weights_only=False)
        assert ckpt["settings"]["num_clusters"] == row["value"]  # the override reached the training
        assert row["selected_step"] in (2, 4)  # the smoke budget's snapshots, chosen on validation
    assert [s["value"] for s in res["summary"]] == [2, 3]
    for s in res["summary"]:
        for m in ("mean_dice", "under_segmentation", "over_segmentation"):
            assert s[m] is not None and s[m] >= 0
    assert json.loads((out / "sweep.json").read_text())["summary"] == res["summary"]
    from medssl.cli import sweep_lines  # what `medssl sweep` prints: one line per K, on the validation split

    lines = sweep_lines(res)
    assert len(lines) == 2 and lines[0].startswith("num_clusters      2: validation mean Dice ")
    assert "over_segmentation" in lines[1]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
