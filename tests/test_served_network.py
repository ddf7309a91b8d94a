"""The benchmark scores the network a bundle serves: semi_cml trains one network per modality, PReL re-trains
the student, and inference serves that one, so every variant of a fold is scored on the student's modality
(region ``inference``) beside each modality and their mean; PReL starts from the Semi-CML model at the step
it is scored at."""

import json

import pytest

from medssl.apps.benchmark import compare, load_spec, run_benchmark, summarise
from medssl.apps.inference_region import add_served_region, served_regions

ENTRY = {"name": "inference", "variant": "method", "file": "prel_choice.json", "key": "student"}


def _run(variant, fold, cases):
    return {"variant": variant, "fraction": 0.1, "fold": fold, "dice": {"flair": 0.5, "t2": 0.4}, "train_seconds": 1.0,
            "labelled_cases": 3,
            "cases": {c: dict(v) for c, v in cases.items()},
            "hd95_cases": {c: {"flair": 3.0, "t2": 4.0} for c in cases}}


def test_each_fold_scores_the_modality_its_method_serves(tmp_path):
    for fold, student in ((0, "t2"), (1, "flair")):
        d = tmp_path / f"fold{fold}" / "f0.1" / "method"
        d.mkdir(parents=True)
        (d / "prel_choice.json").write_text(json.dumps({"teacher": "x", "student": student}))
    served = served_regions(ENTRY, tmp_path, [0, 1], [0.1])
    assert served == {(0, 0.1): "t2", (1, 0.1): "flair"}
    runs = [_run("method", 0, {"a": {"flair": 0.9, "t2": 0.6}}), _run("baseline", 0, {"a": {"flair": 0.8, "t2": 0.3}}),
            _run("method", 1, {"b": {"flair": 0.7, "t2": 0.2}}), _run("baseline", 1, {"b": {"flair": 0.5, "t2": 0.1}})]
    assert add_served_region(runs, ENTRY, served) == ["inference"]
    assert [r["cases"][c]["inference"] for r in runs for c in r["cases"]] == [0.6, 0.3, 0.7, 0.5]
    assert [r["served_region"] for r in runs] == ["t2", "t2", "flair", "flair"]
    rows = {(c["region"]): c for c in compare(runs, [0.1], ["method"], ["flair", "t2"], extra=["inference"])}
    assert rows["inference"]["mean"] == pytest.approx(((0.6 - 0.3) + (0.7 - 0.5)) / 2)
    assert rows["mean"]["mean"] == pytest.approx(((0.75 - 0.55) + (0.45 - 0.3)) / 2)  # over flair and t2 only
    summary = {r["variant"]: r for r in summarise(runs, [0.1], ["method", "baseline"], ["flair", "t2"], ["inference"])}
    assert summary["method"]["dice"]["inference"] == pytest.approx(0.65)
    assert summary["method"]["mean_dice"] == pytest.approx((0.75 + 0.45) / 2)


def test_a_choice_without_its_key_is_refused_naming_the_file(tmp_path):
    d = tmp_path / "fold0" / "f0.1" / "method"
    d.mkdir(parents=True)
    (d / "prel_choice.json").write_text(json.dumps({"teacher": "flair"}))
    with pytest.raises(ValueError, match=r"prel_choice\.json: no 'student'"):
        served_regions(ENTRY, tmp_path, [0], [0.1])


def test_semi_cml_spec_serves_the_student():
    spec = load_spec("semi_cml")
    assert spec.inference_region["variant"] == "method" and spec.inference_region["key"] == "student"
    assert spec.variants["method"].stage == "prel" and spec.verdict_on


@pytest.mark.slow
def test_prel_continues_the_scored_snapshot_and_reports_the_served_network(tmp_path, brats_copy):
    """Through the harness (smoke budget, 2 folds, 6 real cases, half of the training cases labelled): PReL
    starts from cml's snapshot at cml's chosen step, and every variant gets the region ``inference``."""
    out = tmp_path / "bench"
    res = run_benchmark("semi_cml", str(brats_copy(6)), fractions="0.5", folds=2, seed=0, budget="smoke",
                        out=str(out), progress=False, logging_file=False, variants="baseline,cml,method")
    chosen = {s["variant"]: s["step"] for s in res["selected_steps"]}
    for fold in (0, 1):
        trained = json.loads((out / f"fold{fold}" / "f0.5" / "method" / "trained.json").read_text())
        assert trained["continued_from"] == f"model_step{chosen['cml']}.pt"
        student = json.loads((out / f"fold{fold}" / "f0.5" / "method" / "prel_choice.json").read_text())["student"]
        assert res["inference_region"]["served"][f"fold{fold}/f0.5"] == student
        for r in (r for r in res["runs"] if r["fold"] == fold):
            assert all(v["inference"] == v[student] for v in r["cases"].values())
    regions = {(c["variant"], c["region"]) for c in res["comparisons"]}
    assert {("method", "inference"), ("cml", "inference")} <= regions
    prel = [r for r in res["runs"] if r["variant"] == "method"]
    assert all(r["pseudo_loss_curve"] for r in prel)  # the PReL term is kept per run and drawn
    assert not any("pseudo_loss_curve" in r for r in res["runs"] if r["variant"] == "baseline")
    assert (out / "loss_terms.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "Verdicts are about:" in md and "inference Dice" in md
