import json
import subprocess
import sys

import pytest

from medssl.apps.benchmark import run_benchmark


def test_bundles_lists_context_restoration():
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "bundles"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "context_restoration" in r.stdout and "pretrain, train, evaluate, inference" in r.stdout
    assert "Chen" in r.stdout


@pytest.mark.slow
def test_benchmark_harness_writes_its_result_files(tmp_path, brats_dir):
    out = tmp_path / "bench"
    res = run_benchmark("context_restoration", str(brats_dir), fractions="0.2", seeds="0", budget="smoke",
                        out=str(out), progress=False, logging_file=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["bundle"] == "context_restoration" and saved["dataset"] == "brats18_2mm"
    assert saved["peak_rss_mb"] > 100
    assert {r["init"] for r in saved["runs"]} == {"method", "baseline"}
    for r in saved["runs"]:
        assert {"init", "fraction", "seed", "mean_dice", "dice", "train_seconds"} <= set(r)
        assert set(r["dice"]) == {"TC", "WT", "ET"} and r["fraction"] == 0.2 and r["seed"] == 0
    md = (out / "results.md").read_text()
    assert "| 0.2 | 2 | method |" in md and "fraction 0.2: `method`" in md
    # HD95 per region as well as its mean (the BraTS issues ask for both)
    assert "| mean HD95 | TC HD95 | WT HD95 | ET HD95 | train s |" in md
    assert all(set(row["hd95"]) == {"TC", "WT", "ET"} for row in saved["summary"])
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    # finished runs are kept: a second call resumes without training again
    again = run_benchmark("context_restoration", str(brats_dir), fractions="0.2", seeds="0", budget="smoke",
                          out=str(out), progress=False, logging_file=False)
    assert again["runs"] == res["runs"]
    assert again["peak_rss_mb"] >= saved["peak_rss_mb"]  # not the resumed call's own smaller footprint
    # --reevaluate redoes only the evaluation: same trained model, same training time, fresh metrics file
    metrics = out / "seed0" / "f0.2" / "method" / "metrics.json"
    model = out / "seed0" / "f0.2" / "method" / "model.pt"
    stamps = metrics.stat().st_mtime_ns, model.stat().st_mtime_ns
    redone = run_benchmark("context_restoration", str(brats_dir), fractions="0.2", seeds="0", budget="smoke",
                           out=str(out), progress=False, logging_file=False, variants="method", reevaluate=True)
    assert metrics.stat().st_mtime_ns > stamps[0] and model.stat().st_mtime_ns == stamps[1]
    assert [(r["init"], r["train_seconds"]) for r in redone["runs"]] == [(r["init"], r["train_seconds"]) for r in res["runs"]]


def test_benchmark_rejects_unknown_budget(brats_dir, tmp_path):
    with pytest.raises(ValueError, match="budget must be one of"):
        run_benchmark("context_restoration", str(brats_dir), budget="huge", out=str(tmp_path))


@pytest.mark.slow
def test_variants_share_pretrainings_and_each_gets_a_row(tmp_path, brats_dir, monkeypatch):
    from medssl.apps import benchmark as bm

    spec = bm.BENCHMARKS["context_restoration"]
    custom = bm.BenchmarkSpec(dataset=spec.dataset, regions=spec.regions, budgets=spec.budgets,
                              pretrainings={"t20": {}, "t2": {"num_swaps": 2}},
                              variants={"method": bm.Variant({"init": "method"}, "t20"),
                                        "two_swaps": bm.Variant({"init": "method"}, "t2"),
                                        "baseline": bm.Variant({"init": "baseline"})})
    monkeypatch.setitem(bm.BENCHMARKS, "context_restoration", custom)
    with pytest.raises(ValueError, match="unknown variants"):
        run_benchmark("context_restoration", str(brats_dir), out=str(tmp_path), variants="method,three_swaps")
    # a first call trains only some variants and runs only the pretraining they need ...
    first = run_benchmark("context_restoration", str(brats_dir), fractions="0.2", seeds="1", budget="smoke",
                          out=str(tmp_path), progress=False, logging_file=False, variants="method,baseline")
    assert [r["init"] for r in first["runs"]] == ["method", "baseline"]
    assert not (tmp_path / "seed1" / "pretrain_t2").exists()
    # ... a second call adds the others into the same results
    res = run_benchmark("context_restoration", str(brats_dir), fractions="0.2", seeds="1", budget="smoke",
                        out=str(tmp_path), progress=False, logging_file=False, variants="two_swaps")
    assert [r["init"] for r in res["runs"]] == ["method", "two_swaps", "baseline"]
    assert res["runs"][0] == first["runs"][0]
    assert set(res["pretrain_seconds"]) == {"t2", "t20"}
    assert (tmp_path / "seed1" / "pretrain_t2" / "pretrained.pt").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "`two_swaps`" in md and "`method`" in md
