"""The training handlers on plain ignite engines: early stopping on a validation plateau (and staying
stopped when resumed), curves written as JSON, random states restored."""

import json
import random

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from medssl.engines import CurveLog, EarlyStopping


def _engines(scores):
    """A trainer whose output is {"loss": 1/iteration}, validated after every epoch by a validator that
    reports the next value of ``scores`` as ``val_mean_dice``."""
    trainer = Engine(lambda e, b: {"loss": 1.0 / e.state.iteration, "term": 2.0})
    validator = Engine(lambda e, b: None)
    values = iter(scores)

    @validator.on(Events.COMPLETED)
    def _metric(engine):
        engine.state.metrics["val_mean_dice"] = next(values)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run([0]))
    return trainer, validator


def test_early_stopping_stops_after_patience_validations_without_improvement():
    trainer, validator = _engines([0.1, 0.3, 0.2, 0.25, 0.3, 0.9, 0.9])
    stop = EarlyStopping(validator, patience=3)
    stop.attach(trainer)
    trainer.run([0, 1], max_epochs=7)
    assert trainer.state.epoch == 5 and stop.stopped_epoch == 5  # best 0.3 at epoch 2; 3 validations without gain
    # resumed from its state, a stopped run does not train further
    state = stop.state_dict()
    trainer2, validator2 = _engines([1.0] * 7)
    again = EarlyStopping(validator2, patience=3)
    again.attach(trainer2)
    again.load_state_dict(json.loads(json.dumps(state, default=float)))
    trainer2.run([0, 1], max_epochs=7)
    assert trainer2.state.iteration == 0


def test_early_stopping_with_zero_patience_never_stops():
    trainer, validator = _engines([0.5, 0.1, 0.1, 0.1])
    stop = EarlyStopping(validator, patience=0)
    stop.attach(trainer)
    trainer.run([0], max_epochs=4)
    assert trainer.state.epoch == 4 and stop.stopped_epoch == 0


def test_curve_log_writes_loss_terms_and_validation_metrics(tmp_path):
    trainer, validator = _engines([0.1, 0.2, 0.3])
    log = CurveLog(str(tmp_path / "curve.json"), evaluator=validator, keys=("loss", "term"))
    log.attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["loss"] == [[i, round(1.0 / i, 6)] for i in range(1, 7)]
    assert curve["metrics"]["val_mean_dice"] == [[2, 0.1], [4, 0.2], [6, 0.3]]  # at the trainer's iteration
    assert curve["metrics"]["train_term"] == [[i, 2.0] for i in range(1, 7)]
    # restored from its state (as a resumed run does), it continues the same curves
    resumed = CurveLog(str(tmp_path / "again.json"))
    resumed.load_state_dict(log.state_dict())
    assert resumed.loss == log.loss and resumed.metrics == log.metrics


def test_an_epoch_draws_depend_only_on_seed_and_epoch():
    """seed_epoch: what an epoch draws (global generators, each random transform, the loader's shuffle) is
    the same whatever was drawn before it - as for a run resumed at that epoch - and differs between epochs."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, RandFlip, RandGaussianNoise

    from medssl.engines import seed_epoch

    loader = DataLoader(Dataset([np.full((1, 4, 4), i, np.float32) for i in range(6)],
                        Compose([RandFlip(prob=0.5), RandGaussianNoise(prob=1.0)])), batch_size=2, shuffle=True)
    engine = Engine(lambda e, b: None)
    engine.data_loader = loader  # as MONAI's workflows keep it
    engine.state.dataloader = loader

    def epoch_draws(epoch, noise_before):
        for _ in range(noise_before):  # whatever an earlier epoch, a validation or a restart drew
            torch.rand(3), np.random.rand(), random.random(), next(iter(loader))
        engine.state.epoch = epoch
        seed_epoch(engine, 7)
        batches = [next(engine._dataloader_iter) for _ in range(3)]
        return torch.cat(batches), torch.rand(3), np.random.rand(3), random.random()

    first, again, other = epoch_draws(2, 0), epoch_draws(2, 5), epoch_draws(3, 0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


if __name__ == "__main__":
    pytest.main([__file__])


def test_metrics_report_scores_empty_regions_as_the_brats_challenge(tmp_path):
    """An empty region is scored, not skipped: Dice 1 / HD95 0 when truth and prediction are both empty,
    Dice 0 / HD95 = the image diagonal when only one of them is (MONAI alone gives NaN or inf there)."""
    from monai.handlers import HausdorffDistance, MeanDice, from_engine

    from medssl.engines import MetricsReport

    shape = (3, 12, 12, 8)
    full = torch.zeros(shape)
    full[:, 3:8, 3:8, 2:6] = 1

    def case(truth_et: bool, pred_et: bool):
        label, pred = full.clone(), full.clone()
        label[2] *= float(truth_et)
        pred[2] *= float(pred_et)
        return {"pred": pred, "label": label}

    cases = {"both": case(True, True), "none": case(False, False), "hallucinated": case(False, True),
             "missed": case(True, False)}
    engine = Engine(lambda e, batch: [dict(cases[batch[0]["case"]])])  # the decollated output of one case
    engine.state.metric_details = {}
    for name, metric in {"dice": MeanDice(include_background=True, save_details=True,
                                          output_transform=from_engine(["pred", "label"])),
                         "hd95": HausdorffDistance(include_background=True, percentile=95, save_details=True,
                                                   output_transform=from_engine(["pred", "label"]))}.items():
        metric.attach(engine, name)
    MetricsReport(str(tmp_path / "m.json"), ["TC", "WT", "ET"]).attach(engine)
    engine.run([[{"case": name}] for name in cases])
    report = json.loads((tmp_path / "m.json").read_text())
    rows = {r["case"]: r for r in report["per_case"]}
    diagonal = round(float(np.sqrt(11 ** 2 + 11 ** 2 + 7 ** 2)), 6)
    assert [rows[c]["dice"]["ET"] for c in cases] == [1.0, 1.0, 0.0, 0.0]
    assert [rows[c]["hd95"]["ET"] for c in cases] == [0.0, 0.0, diagonal, diagonal]
    assert all(rows[c]["dice"]["WT"] == 1.0 and rows[c]["hd95"]["WT"] == 0.0 for c in cases)
    assert report["dice"]["ET"] == 0.5 and report["empty_regions"] == "BraTS convention for dice, hd95"


def test_pretext_terms_for_the_curves():
    """Barlow Twins' two logged terms add up to MONAI's loss (on + lambda * off) and the redundancy term is
    lower for decorrelated features; the block-mix classifier's accuracy counts argmax hits."""
    from monai.losses import BarlowTwinsLoss

    from medssl.engines import classification_accuracy
    from medssl.engines.barlow_twins import barlow_terms

    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 8, generator=g)
    z2 = z1 + 0.1 * torch.randn(64, 8, generator=g)
    on, off = barlow_terms(z1, z2)
    assert float(on + 0.005 * off) == pytest.approx(float(BarlowTwinsLoss(lambd=0.005)(z1, z2)), rel=1e-5)
    redundant = z1[:, :1].repeat(1, 8) + 0.1 * torch.randn(64, 8, generator=g)
    assert barlow_terms(redundant, redundant)[1] > 10 * off
    output = [{"pred": torch.tensor([0.1, 2.0, -1.0]), "label": torch.tensor(1)},
              {"pred": torch.tensor([3.0, 0.0, 0.0]), "label": torch.tensor(2)}]
    assert classification_accuracy(output) == 0.5
    assert classification_accuracy({"pred": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "label": torch.tensor([1, 0])}) == 1.0


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tmp_path):
    from medssl.engines import NonFiniteLossError, ResumableCheckpoint, StopOnNonFiniteLoss

    losses = iter([1.0, 0.5, float("nan"), 0.2])
    trainer = Engine(lambda e, b: {"loss": next(losses)})
    net = torch.nn.Linear(2, 2)
    ResumableCheckpoint(str(tmp_path), {"network": net}, save_interval=1).attach(trainer)
    StopOnNonFiniteLoss().attach(trainer)
    with pytest.raises(NonFiniteLossError, match="became nan at iteration 3 \\(epoch 2\\)"):
        trainer.run([0, 1], max_epochs=2)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["trainer"]["iteration"] == 2  # the last save is the healthy first epoch's


def test_a_starting_run_removes_the_temporaries_of_a_killed_write(tmp_path):
    from medssl.engines import ResumableCheckpoint
    from medssl.utils import atomic_write_text

    stale = tmp_path / ".train_checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"")  # what a kill during torch.save leaves behind
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    trainer = Engine(lambda e, b: {"loss": 1.0})
    ResumableCheckpoint(str(tmp_path), {"network": torch.nn.Linear(1, 1)}, filename="train_checkpoint.pt").attach(trainer)
    trainer.run([0], max_epochs=1)
    assert not stale.exists() and keep.exists()
    assert (tmp_path / "train_checkpoint.pt").is_file() and not list(tmp_path.glob(".*.tmp"))
    atomic_write_text("x", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "x" and not list(tmp_path.glob(".*.tmp"))
