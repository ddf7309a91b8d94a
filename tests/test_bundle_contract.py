"""Every bundle found by ``list_bundles()`` meets the one written bundle contract (medssl.contract):
files, metadata fields, stages, the ids MONAI's tools read, thin layered configs - and runs from a copy of
its own folder alone, writing where the model zoo expects. A new bundle is covered without editing a list."""

import json
import shutil
from collections import Counter

import pytest

from conftest import REPO, TINY, monai_run
from medssl.bundles import bundle_path, format_config, list_bundles, stage_config_files
from medssl.contract import METRICS_KEYS, METRICS_ROW_KEYS, check_bundle

BUNDLES = [b["name"] for b in list_bundles()]


def test_five_bundles_are_found():
    assert {"context_restoration", "dfr_barlow", "slem", "semi_cml", "cluster_resupervision"} <= set(BUNDLES)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_meets_the_contract(bundle):
    assert check_bundle(bundle_path(bundle)) == []


def test_contract_check_names_what_is_wrong(tmp_path):
    """The check is not vacuous: a copy with an overlay that repeats imports, a long expression, an outside
    reference and a missing stage id is reported line by line."""
    root = tmp_path / "context_restoration"
    shutil.copytree(bundle_path("context_restoration"), root)
    ev = root / "configs" / "evaluate.json"
    cfg = json.loads(ev.read_text())
    cfg["imports"] = ["$import torch"]
    cfg["x"] = "$" + "1 + " * 40 + "1"
    cfg["y"] = "../other_bundle/configs/train.json"
    ev.write_text(json.dumps(cfg))
    (root / "configs" / "inference.json").write_text(json.dumps(
        {k: v for k, v in json.loads((root / "configs" / "inference.json").read_text()).items() if k != "inferer"}))
    problems = "\n".join(check_bundle(root))
    assert "must not repeat 'imports'" in problems
    assert "expression (max 120)" in problems
    assert "outside its bundle folder" in problems
    assert "lacks the id 'inferer'" in problems


@pytest.mark.parametrize("bundle", BUNDLES)
def test_configs_are_in_canonical_form_without_repeated_blocks(bundle):
    """Every config is written as ``format_config`` writes it, and no block of 20 or more lines appears
    twice within a bundle's configs (repeated wiring belongs in train.json, repeated logic in medssl)."""
    texts = {}
    for f in sorted((bundle_path(bundle) / "configs").glob("*.json")):
        text = f.read_text()
        assert text == format_config(json.loads(text)) + "\n", f"{f}: not in canonical form (medssl.bundles.format_config)"
        texts[f.name] = [line.strip() for line in text.splitlines()]
    windows = Counter(tuple(lines[i:i + 20]) for lines in texts.values() for i in range(len(lines) - 19))
    repeated = [w for w, n in windows.items() if n > 1 and sum(len(x) > 3 for x in w) > 10]
    assert not repeated, f"{bundle}: a 20-line block appears twice, starting {repeated[0][:3]}"


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("stage,workflow_type", [("train", "train"), ("evaluate", "infer"), ("inference", "infer")])
def test_monai_property_check_passes_on_layered_configs(bundle, stage, workflow_type):
    """MONAI's own property check (what MONAI Label and the model zoo rely on) finds every id, with the
    overlay stages layered over train.json as the model zoo runs them."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.properties import InferProperties, TrainProperties

    root = bundle_path(bundle)
    wf = ConfigWorkflow(config_file=[str(f) for f in stage_config_files(root, stage)],
                        meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=workflow_type, init="baseline")
    wf.initialize()
    assert wf.check_properties() == []
    props = TrainProperties if workflow_type == "train" else InferProperties
    assert [p["bundle_id"] for p in props.values() if p.get("bundle_id") and p["bundle_id"] not in wf.parser] == []


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_folder_runs_alone_from_inside(bundle, tmp_path, nuclei_copy):
    """A copy of the bundle folder (as unzipped from a zoo) runs train then evaluate from inside it with the
    model zoo's command lines; ``bundle_root`` '.' puts model.pt in its own models/ and metrics.json in its
    own eval/, with the contract's keys and one row per test case."""
    root = tmp_path / bundle
    shutil.copytree(bundle_path(bundle), root)
    small = {"dfr_barlow": ["--batch_size", 4], "cluster_resupervision": ["--batch_size", 4]}.get(bundle, [])
    if bundle == "dfr_barlow":  # 24 of the 664 DSB images: full-size sliding-window evaluation is the cost here
        small += ["--dataset_dir", nuclei_copy(24)]
    monai_run(root / "configs", "train", *TINY, "--val_interval", 1, "--init", "baseline", *small)
    assert (root / "models" / "model.pt").is_file()
    monai_run(root / "configs", "evaluate", *small)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(metrics), sorted(metrics)
    rows = [metrics[k] for k in METRICS_ROW_KEYS if k in metrics]
    assert len(rows) == 1 and len(rows[0]) == metrics["num_cases"] > 0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_eval_metrics_equal_the_results_the_description_names(bundle):
    """metadata ``eval_metrics`` are copied by hand from a committed benchmark: they must equal the summary row
    (results file, variant, fraction) that the description names, so a rerun cannot leave them stale."""
    import re

    meta = json.loads((bundle_path(bundle) / "configs" / "metadata.json").read_text())
    found = re.search(r"from (docs/results/\S+/results\.json) \(summary, variant (\w+), fraction ([\d.]+)\)",
                      meta["description"])
    assert found, f"{bundle}: the description does not name the results its eval_metrics come from"
    path, variant, fraction = found.groups()
    rows = [s for s in json.loads((REPO / path).read_text())["summary"]
            if s["variant"] == variant and s["fraction"] == float(fraction)]
    assert len(rows) == 1, f"{path}: no single summary row for {variant} at {fraction}"
    expected = {"mean_dice": rows[0]["mean_dice"], **{f"dice_{r}": v for r, v in rows[0]["dice"].items()}}
    assert meta["eval_metrics"] == pytest.approx(expected, abs=5e-5)
