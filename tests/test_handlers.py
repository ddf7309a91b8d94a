"""The training handlers on plain ignite engines: early stopping on a validation plateau (and staying
stopped when resumed), curves written as JSON, random states restored."""

import json
import random

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from medssl.engines import CurveLog, EarlyStopping, RandomStates


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


def test_random_states_restore_every_generator_and_each_transform():
    from monai.transforms import Compose, RandFlip, RandGaussianNoise

    class Loader:  # what RandomStates reads: engine.data_loader.dataset.transform
        class dataset:
            transform = Compose([RandFlip(prob=0.5), RandGaussianNoise(prob=1.0)])

    engine = type("E", (), {"data_loader": Loader()})()
    states = RandomStates(engine)
    saved = states.state_dict()
    assert len(saved["transforms"]) == 3  # the Compose and its two random transforms

    def draw():
        t = Loader.dataset.transform
        return (torch.rand(3), np.random.rand(3), random.random(), t.transforms[1].R.rand(), t.R.rand())

    first = draw()
    states.load_state_dict(saved)
    second = draw()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == "__main__":
    pytest.main([__file__])
