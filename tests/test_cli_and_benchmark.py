import json
import subprocess
import sys

import numpy as np
import pytest

from medssl.apps.benchmark import run_benchmark

SMOKE = dict(fractions="0.2", folds=2, seed=0, budget="smoke", progress=False, logging_file=False)


def test_bundles_lists_context_restoration():
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "bundles"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "context_restoration" in r.stdout and "pretrain, train, evaluate, inference" in r.stdout
    assert "Chen" in r.stdout


def test_every_bundle_has_a_consistent_benchmark_json():
    """Each bundle's benchmark.json loads (canonically formatted); a variant's ``pretrain`` names one of its
    pretrainings, its ``continues`` an earlier variant, and every variant's stage is one of the bundle's."""
    from medssl.apps.benchmark import BENCHMARKS, BenchmarkSpec, load_spec
    from medssl.bundles import bundle_path, bundle_stages, format_config, list_bundles

    names = [b["name"] for b in list_bundles()]
    assert sorted(BENCHMARKS) == sorted(names) and len(names) == 5
    for name in names:
        path = bundle_path(name) / "benchmark.json"
        assert path.read_text() == format_config(json.loads(path.read_text())) + "\n", path
        spec = load_spec(name)
        assert isinstance(spec, BenchmarkSpec) and spec.problems() == [] and spec.folds >= 2
        assert "baseline" in spec.variants and {"full", "small", "smoke"} <= set(spec.budgets)
        for i, (v, variant) in enumerate(spec.variants.items()):
            assert variant.pretrain is None or variant.pretrain in spec.pretrainings, (name, v)
            assert variant.continues is None or variant.continues[0] in list(spec.variants)[:i], (name, v)
            assert variant.stage is None or variant.stage in bundle_stages(bundle_path(name)), (name, v)
            assert variant.stage is not None or variant.continues, (name, v)
    with pytest.raises(TypeError):
        BENCHMARKS["slem"] = None  # read-only


def _runs(gain: float, folds: int = 2, cases: int = 4) -> list[dict]:
    """Synthetic run records: ``method`` = ``baseline`` + ``gain`` Dice on every case and region."""
    import numpy as np

    rng = np.random.default_rng(0)
    runs = []
    for fold in range(folds):
        base = {f"c{fold}{i}": {"TC": float(rng.uniform(0.3, 0.6)), "WT": float(rng.uniform(0.3, 0.6))}
                for i in range(cases)}
        for name, add in (("method", gain), ("baseline", 0.0)):
            per = {c: {g: v + add for g, v in d.items()} for c, d in base.items()}
            runs.append({"variant": name, "fraction": 0.2, "fold": fold, "seed": 0, "labelled_cases": 2,
                         "train_seconds": 1.0, "num_cases": cases, "precision": 0.5, "hd95_unit": "voxels",
                         "dice": {g: float(np.mean([d[g] for d in per.values()])) for g in ("TC", "WT")},
                         "mean_dice": 0.5, "cases": per,
                         "hd95_cases": {c: {"TC": 3.0, "WT": None} for c in per}})
    return runs


def test_report_gives_paired_verdicts_on_synthetic_runs(tmp_path):
    """No training: a variant better on every case is 'better' with a CI above 0, per region and for the
    per-case mean; summary rows pool the cases of all folds; the markdown has the comparison table."""
    from medssl.apps.benchmark import plot_label_efficiency, report, results_markdown, run_record

    results = {"bundle": "x", "dataset": "d", "budget": "smoke", "fractions": [0.2], "folds": 2, "seed": 0,
               "regions": ["TC", "WT"], "runs": _runs(0.05)}
    report(results, ["method", "baseline"], reference=("baseline", 0.2))
    comps = {c["region"]: c for c in results["comparisons"]}
    assert set(comps) == {"mean", "TC", "WT"}
    for c in comps.values():
        assert c["variant"] == "method" and c["n"] == 8 and c["better"] == 8 and c["worse"] == 0
        assert c["verdict"] == "better" and 0 < c["ci"][0] <= c["mean"] <= c["ci"][1]
        assert c["mean"] == pytest.approx(0.05)
    rows = {r["variant"]: r for r in results["summary"]}
    assert rows["method"]["n_cases"] == 8 and rows["method"]["n_folds"] == 2
    assert rows["method"]["mean_dice"] == pytest.approx(rows["baseline"]["mean_dice"] + 0.05, abs=1e-3)
    assert rows["method"]["mean_dice_ci"][0] < rows["method"]["mean_dice"] < rows["method"]["mean_dice_ci"][1]
    assert rows["method"]["hd95"] == {"TC": 3.0, "WT": None} and rows["method"]["metrics"] == {"precision": 0.5}
    assert [r["WT"]["ratio"] > 1 for r in results["ratio_to_reference"] if r["variant"] == "method"] == [True]
    md = results_markdown(results)
    assert "| fraction | variant | region | mean Δ Dice | 95% CI | better/worse cases | verdict |" in md
    assert "| 0.2 | method | mean | +0.050 |" in md and "| 8/0 | better |" in md
    assert "| precision |" in md
    same = dict(results, runs=_runs(0.0))
    report(same, ["method", "baseline"])
    assert {c["verdict"] for c in same["comparisons"]} == {"no detectable difference"}
    # a weak (per-slice) report: records keyed case/slice; every scalar and region dict copied
    weak = {"num_cases": 3, "dice": {"WT": 0.5}, "mean_dice": 0.5, "hd95": {"WT": 4.0}, "false_positive_rate": 0.1,
            "hd95_unit": "pixels", "gate": True, "per_slice": [
                {"case": "a", "slice": 3, "tumour": True, "dice": 0.5, "hd95": 4.0},
                {"case": "a", "slice": 4, "tumour": False}]}
    rec = run_record(weak, variant="method", fraction=1.0, fold=0, seed=0, labelled_cases=2, train_seconds=1.0)
    assert rec["cases"] == {"a/3": {"WT": 0.5}} and rec["hd95_cases"] == {"a/3": {"WT": 4.0}}
    assert rec["false_positive_rate"] == 0.1 and rec["gate"] is True and "per_slice" not in rec
    plot_label_efficiency(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_benchmark_harness_writes_its_result_files(tmp_path, brats_copy):
    data = brats_copy(6)
    out = tmp_path / "bench"
    run_benchmark("context_restoration", str(data), out=str(out), **SMOKE)
    saved = json.loads((out / "results.json").read_text())
    assert saved["bundle"] == "context_restoration" and saved["folds"] == 2 and saved["seed"] == 0
    assert saved["peak_rss_mb"] > 100
    assert {(r["variant"], r["fold"]) for r in saved["runs"]} == {(v, k) for v in ("method", "baseline")
                                                                  for k in (0, 1)}
    for r in saved["runs"]:
        assert {"variant", "fraction", "fold", "seed", "labelled_cases", "train_seconds", "mean_dice", "dice", "cases",
                "hd95_cases", "num_cases", "mean_hd95", "hd95", "hd95_unit", "checkpoint"} <= set(r)
        assert set(r["dice"]) == {"TC", "WT", "ET"} and r["fraction"] == 0.2
        assert all(set(v) == {"TC", "WT", "ET"} for v in r["cases"].values())
    # cross-validation: every case of the data set is a test case exactly once, for each variant
    for v in ("method", "baseline"):
        tested = [c for r in saved["runs"] if r["variant"] == v for c in r["cases"]]
        assert sorted(tested) == sorted(p.name for p in data.iterdir())
    # pretraining saw only the fold's training cases
    for k in (0, 1):
        datalist = json.loads((out / f"fold{k}" / "datalist_f0.2.json").read_text())
        assert not {c["case"] for c in datalist["training"]} & {c["case"] for c in datalist["test"]}
    assert {r["n_cases"] for r in saved["summary"]} == {6}
    assert {c["region"] for c in saved["comparisons"]} == {"mean", "TC", "WT", "ET"}
    md = (out / "results.md").read_text()
    assert "| 0.2 | 1 | method | 6 |" in md  # 6 cases, 2 folds: 3 test, 1 validation, 2 training, 1 labelled
    assert "| fraction | variant | region | mean Δ Dice | 95% CI | better/worse cases | verdict |" in md
    # every fold's pretraining measured its pretext on held-out crops of its validation case beside the identity;
    # 2 steps cannot beat it, so the method's verdict says so instead of a verdict about the method
    health = saved["pretext_health"]["method"]
    assert set(health) == {"0", "1"} and all(h["trivial_rule"] == "identity" and h["crops"] == 16 for h in health.values())
    assert not any(h["learned"] for h in health.values())
    assert any(line.startswith("| 0.2 | method | mean |") and line.rstrip(" |").endswith("pretext not learned")
               for line in md.splitlines())
    assert {c["statistical_verdict"] for c in saved["comparisons"]} <= {"better", "worse", "no detectable difference"}
    assert "| method | 0 | restoration_mse |" in md and (out / "pretext_curves.png").is_file()
    assert "| mean HD95 | TC HD95 | WT HD95 | ET HD95 | train s |" in md
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    # converged training: every run's curves are recorded and drawn; the smoke budget selects the training
    # length (snapshots at steps 2 and 4) by the validation Dice pooled over both folds
    assert {(s["fraction"], s["variant"]) for s in saved["selected_steps"]} == {(0.2, "method"), (0.2, "baseline")}
    for s in saved["selected_steps"]:
        runs = [r for r in saved["runs"] if r["variant"] == s["variant"]]
        pooled = {step: np.mean([dict(r["val_curve"])[step] for r in runs]) for step in (2, 4)}
        assert s["validation"] == {str(k): pytest.approx(v, abs=1e-4) for k, v in pooled.items()}
        assert s["step"] == max(pooled, key=lambda k: (pooled[k], -k))
        assert all(r["selected_step"] == s["step"] and r["checkpoint"].endswith(f"model_step{s['step']}.pt")
                   for r in runs)
    assert all(r["steps"] == 4 and len(r["loss_curve"]) >= 1 and len(r["val_curve"]) == 2 for r in saved["runs"])
    assert set(saved["pretrain_curves"]["method"]) == {"0", "1"}
    for png in ("validation_curves.png", "pretext_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # reproducible: the same runs again, in a fresh folder, give the same Dice on every case
    again_out = tmp_path / "again"
    # a pretraining that no selected variant needs, left unfinished by an earlier call: reported if finished, else skipped
    (again_out / "fold0" / "pretrain_method").mkdir(parents=True)
    rerun = run_benchmark("context_restoration", str(data), out=str(again_out), variants="baseline", **SMOKE)
    assert [r["cases"] for r in rerun["runs"]] == [r["cases"] for r in saved["runs"] if r["variant"] == "baseline"]
    # an unfinished run (cut off after its training's last checkpoint) resumes from it, to the same numbers
    cut = out / "fold1" / "f0.2" / "baseline"
    assert json.loads((cut / "run.json").read_text())["stage"] == "train"  # the training's own record
    (cut / "result.json").unlink()
    (cut / "trained.json").unlink()
    resumed = run_benchmark("context_restoration", str(data), out=str(out), variants="baseline", **SMOKE)
    assert resumed["runs"][-1]["cases"] == saved["runs"][-1]["cases"]
    # finished runs are kept: a second call resumes without training again
    model = out / "fold1" / "f0.2" / "method" / "model.pt"
    metrics = model.with_name("metrics.json")
    stamps = metrics.stat().st_mtime_ns, model.stat().st_mtime_ns
    again = run_benchmark("context_restoration", str(data), out=str(out), **SMOKE)
    assert again["runs"] == resumed["runs"] and metrics.stat().st_mtime_ns == stamps[0]
    assert again["peak_rss_mb"] >= saved["peak_rss_mb"]  # not the resumed call's own smaller footprint
    # --reevaluate redoes only the evaluation: same trained model, same training time, fresh metrics file
    redone = run_benchmark("context_restoration", str(data), out=str(out), variants="method", reevaluate=True, **SMOKE)
    assert metrics.stat().st_mtime_ns > stamps[0] and model.stat().st_mtime_ns == stamps[1]
    assert [(r["variant"], r["train_seconds"]) for r in redone["runs"]] == [(r["variant"], r["train_seconds"])
                                                                          for r in resumed["runs"]]
    with pytest.raises(ValueError, match="folds=2, seed=0"):  # another cross-validation needs another --out
        run_benchmark("context_restoration", str(data), out=str(out), **dict(SMOKE, folds=3))


@pytest.mark.slow
def test_runs_trained_in_parallel_workers_give_the_sequential_numbers(tmp_path, brats_copy):
    """--workers 2 trains two runs at a time in their own processes (each with half of this process's threads); with
    one thread each way, every case's Dice equals a sequential run's."""
    import torch

    data, threads = str(brats_copy(6)), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_benchmark("context_restoration", data, out=str(tmp_path / "seq"), variants="baseline", **SMOKE)
        torch.set_num_threads(2)
        two = run_benchmark("context_restoration", data, out=str(tmp_path / "par"), variants="baseline", workers=2,
                            **SMOKE)
    finally:
        torch.set_num_threads(threads)
    assert [(r["fold"], r["steps"]) for r in two["runs"]] == [(0, 4), (1, 4)]
    assert [r["cases"] for r in two["runs"]] == [r["cases"] for r in one["runs"]]


def test_benchmark_rejects_unknown_budget(brats_dir, tmp_path):
    with pytest.raises(ValueError, match="budget must be one of"):
        run_benchmark("context_restoration", str(brats_dir), budget="huge", out=str(tmp_path))
    with pytest.raises(ValueError, match="no benchmark defined"):
        run_benchmark("nope", str(brats_dir), out=str(tmp_path))


@pytest.mark.slow
def test_variants_share_pretrainings_and_each_gets_a_row(tmp_path, brats_copy, monkeypatch):
    from medssl.apps import benchmark as bm

    spec = bm.load_spec("context_restoration")
    custom = bm.BenchmarkSpec(dataset=spec.dataset, regions=spec.regions, budgets=spec.budgets,
                              pretrainings={"t20": {}, "t2": {"num_swaps": 2}},
                              variants={"method": bm.Variant({"init": "method"}, "t20"),
                                        "two_swaps": bm.Variant({"init": "method"}, "t2"),
                                        "baseline": bm.Variant({"init": "baseline"})})
    monkeypatch.setattr(bm, "load_spec", lambda bundle: custom)
    data, out = brats_copy(6), tmp_path / "bench"
    with pytest.raises(ValueError, match="unknown variants"):
        run_benchmark("context_restoration", str(data), out=str(out), variants="method,three_swaps")
    # a first call trains only some variants and runs only the pretraining they need ...
    first = run_benchmark("context_restoration", str(data), out=str(out), variants="method,baseline", **SMOKE)
    assert [(r["fold"], r["variant"]) for r in first["runs"]] == [(0, "method"), (0, "baseline"),
                                                                 (1, "method"), (1, "baseline")]
    assert not (out / "fold0" / "pretrain_t2").exists()
    # ... a second call adds the others into the same results
    res = run_benchmark("context_restoration", str(data), out=str(out), variants="two_swaps", **SMOKE)
    assert [r["variant"] for r in res["runs"]] == ["method", "two_swaps", "baseline"] * 2
    assert res["runs"][0] == first["runs"][0]
    assert set(res["pretrain_seconds"]) == {"t2", "t20"} and set(res["pretrain_seconds"]["t2"]) == {"0", "1"}
    assert (out / "fold1" / "pretrain_t2" / "pretrained.pt").is_file()
    assert [c["variant"] for c in res["comparisons"] if c["region"] == "mean"] == ["method", "two_swaps"]
    md = (out / "results.md").read_text()
    assert "| 0.2 | two_swaps | mean |" in md and "| 0.2 | method | mean |" in md

    # another benchmark folder takes these finished pretrainings (same settings and folds) instead of repeating them
    pretrainings = {p.relative_to(out): p.read_bytes() for p in out.glob("fold*/pretrain_t20/*") if p.is_file()}
    calls = []
    monkeypatch.setattr(bm, "run_stage", lambda bundle, stage, *a, _run=bm.run_stage, **kw:
                        calls.append(stage) or _run(bundle, stage, *a, **kw))
    other = tmp_path / "other"
    again = run_benchmark("context_restoration", str(data), out=str(other), variants="method", pretrained_from=str(out),
                          **SMOKE)
    assert "pretrain" not in calls and calls.count("train") == 2
    assert {p: (other / p).read_bytes() for p in pretrainings} == pretrainings
    assert again["pretrained_from"] == [str(out.resolve())]
    assert again["pretrain_seconds"]["t20"] == res["pretrain_seconds"]["t20"]
    # one that differs in a setting is refused before any training, naming its record and the setting
    custom.pretrainings["t20"] = {"num_swaps": 3}
    calls.clear()
    with pytest.raises(ValueError, match=r"fold0/pretrain_t20/run.json: .*'num_swaps': \(None, 3\)"):
        run_benchmark("context_restoration", str(data), out=str(tmp_path / "third"), variants="method",
                      pretrained_from=str(out), **SMOKE)
    assert calls == []


@pytest.mark.slow
def test_pretraining_length_sweep(tmp_path, brats_copy, monkeypatch):
    """The sweep fine-tunes the method from pretrainings of each length (0: the baseline) on one fold and
    draws fine-tuned Dice against pretraining steps."""
    from medssl.apps import benchmark as bm

    spec = bm.load_spec("context_restoration")
    spec.sweeps = {"length": {"variant": "method", "fraction": 0.2, "fold": 1, "folds": 2, "steps": [0, 2, 4]}}
    monkeypatch.setattr(bm, "load_spec", lambda bundle: spec)
    out = tmp_path / "sweep"
    res = bm.run_sweep("context_restoration", str(brats_copy(6)), "length", budget="smoke", out=str(out),
                       progress=False, logging_file=False)
    assert [(r["pretrain_steps"], r["variant"], r["fold"]) for r in res["rows"]] == [
        (0, "baseline", 1), (2, "method_2", 1), (4, "method_4", 1)]
    assert json.loads((out / "fold1" / "pretrain_method_4" / "timing.json").read_text())["steps"] == 4
    assert not (out / "fold0" / "pretrain_method_2").exists()  # one fold only
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "sweep.json").read_text())["rows"] == res["rows"]


OTHER_BUNDLES = {"dfr_barlow": None, "slem": None, "semi_cml": None, "cluster_resupervision": None}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(OTHER_BUNDLES))
def test_every_bundle_runs_through_the_harness(bundle, tmp_path, brats_copy, nuclei_copy):
    """The four other bundles' benchmarks (their own benchmark.json, all variants) through the same
    harness at the smoke budget: 2 folds, every case tested once per variant, a paired comparison."""
    from medssl.apps.benchmark import load_spec

    spec = load_spec(bundle)
    data = brats_copy(4) if spec.dataset == "brats18_2mm" else nuclei_copy(16)
    res = run_benchmark(bundle, str(data), out=str(tmp_path / "bench"), **dict(SMOKE, fractions="1.0"))
    assert {r["variant"] for r in res["runs"]} == set(spec.names) and {r["fold"] for r in res["runs"]} == {0, 1}
    for name in spec.names:
        tested = sorted(c.split("/")[0] for r in res["runs"] if r["variant"] == name for c in r["cases"])
        assert set(tested) == {p.name.split(".")[0] for p in (data.iterdir() if spec.dataset == "brats18_2mm"
                                                              else (data / "images").iterdir())}
    assert {c["variant"] for c in res["comparisons"] if c["baseline"] == "baseline"} == set(spec.names) - {"baseline"}
    assert {(c["variant"], c["baseline"]) for c in res["comparisons"] if c["baseline"] != "baseline"} == \
        {(p["variant"], p["against"]) for p in spec.pairs.values() if p["against"] != "baseline"}  # the spec's pairs
    assert (tmp_path / "bench" / "results.md").is_file()
    for r in (r for r in res["runs"] if r["variant"] == "cam_fine"):  # cluster_resupervision's fair CAM baseline:
        fold = tmp_path / "bench" / f"fold{r['fold']}"  # its threshold chosen on the fold's validation cases only
        chosen = json.loads((fold / "f1" / "cam_fine" / "threshold.json").read_text())
        validation = {c["case"] for c in json.loads((fold / "datalist_f1.json").read_text())["validation"]}
        assert r["threshold"] == chosen["threshold"] and set(chosen["threshold_selection"]["cases"]) == validation
        assert not validation & {c.split("/")[0] for c in r["cases"]}  # none of them a test case


def test_paired_bootstrap_verdicts():
    """A clear per-case gain is 'better' with a CI above 0; a symmetric one crosses 0; the same seed gives
    the same interval; unpaired cases are refused."""
    import numpy as np

    from medssl.apps.stats import paired_bootstrap, paired_differences

    rng = np.random.default_rng(1)
    gain = paired_bootstrap(0.05 + 0.02 * rng.standard_normal(15))
    assert gain["verdict"] == "better" and 0 < gain["ci"][0] < gain["mean"] < gain["ci"][1] and gain["better"] >= 13
    assert paired_bootstrap(-0.05 + 0.02 * rng.standard_normal(15))["verdict"] == "worse"
    noise = paired_bootstrap([0.1, -0.1, 0.05, -0.05, 0.02, -0.02])
    assert noise["verdict"] == "no detectable difference" and noise["ci"][0] < 0 < noise["ci"][1]
    assert paired_bootstrap([0.1, -0.2, 0.3]) == paired_bootstrap([0.1, -0.2, 0.3])
    assert paired_differences({"0/a": 0.5, "0/b": 0.7}, {"0/a": 0.4, "0/b": 0.9}) == pytest.approx([0.1, -0.2])
    with pytest.raises(ValueError, match="unpaired"):
        paired_differences({"0/a": 0.5}, {"0/b": 0.4})
