"""semi_cml: the fixes of the PReL / area-similarity-contrastive issue - an equal-step control for PReL and the
variant pairs that isolate each component in the benchmark spec, and negatives of the contrastive loss drawn
from other cases only, enough of them, through the bundle's own data pipeline on the real BraTS sample."""

import json

import pytest
import torch

from monai.bundle import ConfigParser

from medssl.apps.benchmark import compare, load_spec, report, results_markdown, select_steps, training_curve
from medssl.bundles import bundle_path, stage_config_files
from medssl.engines.semi import keep_networks


@pytest.fixture(scope="module")
def spec():
    return load_spec("semi_cml")


def _train(spec, name):
    return {**spec.budgets["converged"]["train"], **spec.variants[name].train}


def _differences(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_prel_has_an_equal_step_control(spec):
    """``equal_step_control`` is ``method`` with the pseudo-label term off: the same PReL stage continued from the
    same Semi-CML model, the same budget (so the same number of added steps), only ``pseudo_weight`` 0."""
    method, control = spec.variants["method"], spec.variants["equal_step_control"]
    assert (control.stage, control.continues) == (method.stage, method.continues) == ("prel", ("cml", "cml_ckpt"))
    for budget in spec.budgets:
        b = spec.budgets[budget].get("train", {})
        assert _differences({**b, **method.train}, {**b, **control.train}) == {"pseudo_weight": (None, 0.0)}


def test_spec_names_the_pairs_that_isolate_each_component(spec):
    """PReL: method vs its equal-step control; CML as a whole: cml vs the labels-only baseline; the contrastive
    term alone: cml vs mutual, which differ only in ``contrastive_weight``."""
    pairs = {name: (p["variant"], p["against"]) for name, p in spec.pairs.items()}
    assert pairs == {"prel": ("method", "equal_step_control"), "cml_alone": ("cml", "baseline"),
                     "contrastive_term": ("cml", "mutual")}
    assert _differences(_train(spec, "cml"), _train(spec, "mutual")) == {"contrastive_weight": (None, 0.0)}
    assert _differences(_train(spec, "cml"), _train(spec, "baseline")) == {"method": ("cml", "supervised")}
    assert spec.problems() == []


def test_pairs_are_compared_case_by_case(spec):
    """The harness reports each spec pair as a paired comparison against its own reference variant."""
    runs = [{"variant": v, "fraction": 0.1, "fold": k, "train_seconds": 1.0, "labelled_cases": 1,
             "cases": {f"c{i}": {"flair": 0.5 + 0.1 * (v == "method") + 0.01 * i, "t2": 0.4} for i in range(6)}}
            for v in ("baseline", "method", "equal_step_control") for k in (0, 1)]
    results = report({"runs": runs, "fractions": [0.1], "regions": ["flair", "t2"]},
                     ["baseline", "method", "equal_step_control"], pairs={"prel": spec.pairs["prel"]})
    rows = [c for c in results["comparisons"] if c["baseline"] == "equal_step_control"]
    assert [c["region"] for c in rows] == ["mean", "flair", "t2"] and rows[0]["variant"] == "method"
    assert rows[1]["mean"] == pytest.approx(0.1) and rows[1]["better"] == 12 and rows[2]["mean"] == 0
    assert rows == compare(runs, [0.1], ["method"], ["flair", "t2"], baseline="equal_step_control")
    results.update(bundle="semi_cml", dataset="brats18_2mm", budget="converged", folds=2, seed=0)
    assert "| 0.1 | method vs equal_step_control | flair | +0.100 |" in results_markdown(results)


def test_converged_budget_validates_at_every_snapshot(spec):
    """Each snapshot step of the converged budget has a validation (the training length is chosen there), in
    both stages, and the budget trains at least to its last snapshot."""
    b = spec.budgets["converged"]
    assert b["select_step"] and b["train"]["patience"] == 0
    steps, every = b["train"]["snapshot_steps"], b["train"]["epoch_length"] * b["train"]["val_interval"]
    assert steps and all(s % every == 0 for s in steps)
    assert max(steps) <= b["train"]["max_epochs"] * b["train"]["epoch_length"]


def test_prel_without_unlabelled_cases_keeps_the_snapshots_and_curve(tmp_path):
    """At 100% labels PReL (and its control) keeps the Semi-CML networks; it keeps their step snapshots and
    validation curve too, so that the training length chosen on validation selects the same model."""
    cml = tmp_path / "cml"
    cml.mkdir()
    for f in ("model.pt", "model_flair.pt", "model_t2.pt", "model_step100.pt", "model_step200.pt"):
        torch.save({"w": torch.tensor(float(len(f)))}, cml / f)
    (cml / "train_curve.json").write_text(json.dumps({"loss": [[1, 1.0], [200, 0.5]],
                                                       "metrics": {"val_mean_dice": [[100, 0.4], [200, 0.5]]}}))
    keep_networks(str(cml / "model.pt"), str(tmp_path / "prel"))
    assert sorted(p.name for p in (tmp_path / "prel").iterdir()) == sorted(p.name for p in cml.iterdir())
    kept, own = training_curve(tmp_path / "prel"), training_curve(cml)
    assert kept == own and kept["val_curve"] == [[100, 0.4], [200, 0.5]]
    assert select_steps({"method": [kept]}, [100, 200])["method"] == select_steps({"cml": [own]}, [100, 200])["cml"]


def test_bundle_contrastive_negatives_come_from_other_cases(tmp_path):
    """The bundle's train stage on the real BraTS sample (10% labels: the one labelled case is in every step, and
    in the unlabelled stream too): every call of the contrastive loss gets the case of each crop, no negative
    shares its anchor's case, and once the queue has warmed up every crop has at least ``asc_min_negatives``."""
    root = bundle_path("semi_cml")
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(root, "train")])
    for k, v in {"bundle_root": str(root), "ckpt_dir": str(tmp_path), "max_epochs": 1, "epoch_length": 12,
                 "val_interval": 10, "channels": [4, 8, 16, 32, 64], "roi_size": [32, 32, 32],
                 "asc_queue_size": 24, "asc_min_negatives": 8}.items():
        parser[k] = v
    parser.get_parsed_content("initialize")
    trainer, asc = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("contrastive_loss")
    calls, forward = [], asc.forward

    def recording(a, b, case_ids=None):
        queued = None if asc.queue_ids is None else asc.queue_ids.clone()
        out = forward(a, b, case_ids=case_ids)
        calls.append((list(case_ids), queued, asc.last_negatives.clone()))
        return out

    asc.forward = recording
    trainer.run()
    assert len(calls) == 12
    labelled = {c["case"] for c in parser.get_parsed_content("train#dataset#data")}
    for step, (ids, queued, negatives) in enumerate(calls):
        assert len(ids) == 4 and ids[0] == ids[1] and ids[0] in labelled  # 2 labelled + 2 unlabelled crops
        index = asc.case_index(ids, 4)
        keys = index if queued is None else torch.cat([index, queued])
        mask = asc.negative_mask(index, keys)
        assert not (mask & (index[:, None] == keys[None])).any()
        assert torch.equal(negatives, mask.sum(1))
        if step >= 8:  # 32 earlier crops queued (24 kept) from several cases
            assert negatives.min() >= 8, (step, negatives)
    curve = json.loads((tmp_path / "train_curve.json").read_text())["metrics"]
    assert curve["train_asc_kept"][-1][1] == 1.0 and curve["train_asc_negatives"][-1][1] >= 8
