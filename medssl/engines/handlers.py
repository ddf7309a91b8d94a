"""Ignite handlers for durable runs: atomic checkpoints with resume, best-model saving, metric reports.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``); these write a temp file and rename
it, so an interrupted run never leaves a half-written checkpoint, and a restarted run resumes from
the last completed epoch.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from monai.handlers import MetricLogger
from monai.transforms import Randomizable
from monai.utils import MAX_SEED
from monai.utils import min_version, optional_import

from ..utils import atomic_torch_save, atomic_write_json, remove_stale_temporaries

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Checkpoint, _ = optional_import("ignite.handlers", "0.4.11", min_version, "Checkpoint")

logger = logging.getLogger(__name__)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, torch.nn.Module) else network


def _streams(engine) -> list:
    """The data loaders an engine draws from: its own and, for a two-stream ``iteration_update``
    (:class:`medssl.engines.TwoStreamIteration`), the extra ones it names in ``extra_loaders``."""
    update = getattr(engine, "_process_function", None)  # where ignite's Engine keeps its iteration function
    return [getattr(engine, "data_loader", None), *getattr(update, "extra_loaders", ())]


def _random_transforms(engine) -> list:
    """The random transforms of the engine's data loaders (each holds its own ``RandomState``)."""
    found = []
    for loader in _streams(engine):
        stack = [getattr(getattr(loader, "dataset", None), "transform", None)]
        while stack:
            t = stack.pop(0)
            if isinstance(t, Randomizable):
                found.append(t)
            stack.extend(getattr(t, "transforms", None) or [])
    return found


def seed_epoch(engine, seed: int) -> None:
    """Start ``engine``'s epoch ``engine.state.epoch`` from random states that depend only on ``seed``,
    that epoch (and the distributed rank): torch's, numpy's and Python's generators and each random
    transform of its loaders are reseeded, and every loader starts a new pass (a new iterator, so a new
    shuffle and new worker seeds). An epoch then draws the same crops, flips, batch order and dropout
    masks whether the run went through uninterrupted or was resumed at its start - which is what makes
    a resumed run exact, where saving the generators' states would not (the loader's position within a
    pass, its prefetching workers and the draws of handlers that run after the checkpoint is written
    are not in any state dict)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    state = np.random.SeedSequence([int(seed) % 2**63, int(engine.state.epoch), rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[0]))
    random.seed(int(state[0]))
    for i, t in enumerate(_random_transforms(engine)):
        t.set_random_state(seed=(int(state[1]) + i) % MAX_SEED)
    update = getattr(engine, "_process_function", None)
    if hasattr(update, "start_epoch"):
        update.start_epoch(engine.state.epoch)
    if engine.state.dataloader is not None:
        engine.set_data(engine.state.dataloader)


class SettingsMismatchError(ValueError):
    """A checkpoint folder holds a run trained with other settings than the run asked to resume it."""


def _comparable(value):
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


_SHOWN = 6  # differing settings shown with both values in a SettingsMismatchError; the rest are named
_NAMED = 20


def check_resume_settings(path, saved: Mapping | None, settings: Mapping) -> None:
    """Raise :class:`SettingsMismatchError` where the checkpoint ``path``, saved with ``saved`` settings, holds
    a run with other ``settings`` than those given now (both as :func:`medssl.bundles.run_settings` derives
    them): each differing setting named by its config id (``patch_size``, ``network_def#channels``), the first
    few with both values, the count where there are many. A checkpoint without settings, or a run given
    none, is not checked."""
    if saved is None or not settings:
        return
    saved, settings = _comparable(dict(saved)), _comparable(dict(settings))
    differ = sorted((k for k in set(saved) | set(settings) if saved.get(k, ...) != settings.get(k, ...)),
                    key=lambda k: (not (k in saved and k in settings), k))  # changed values first, then absent ones
    if not differ:
        return

    def value(d, k):
        if k not in d:
            return "unset"
        text = repr(d[k])
        return text if len(text) <= 60 else text[:57] + "..."

    said = [f"{k}: {value(saved, k)} there, {value(settings, k)} now" for k in differ[:_SHOWN]]
    rest = differ[_SHOWN:]
    if rest:
        names = ", ".join(rest[:_NAMED]) + (", ..." if len(rest) > _NAMED else "")
        said.append(f"{len(differ)} settings differ in all, also {names}")
    unset = sum(k not in saved for k in settings)
    if unset > len(settings) // 2:
        said.append(f"the checkpoint records {len(saved)} settings, not the {len(settings)} compared now: it was "
                    "saved by an older medssl, which compared fewer")
    raise SettingsMismatchError(
        f"{path}: holds a run with other settings ({'; '.join(said)}); expected the same settings to resume it: "
        "use another ckpt_dir, or set resume to false to train afresh over it")


class ResumableCheckpoint:
    """Save ``save_dict`` atomically to ``save_dir/filename`` every ``save_interval`` epochs and at the end;
    when ``resume`` and that file exists at start, restore every object from it first. The engine it
    is attached to is saved and restored too (as ``"trainer"``), so a resumed run continues at the epoch
    where the last one stopped. Every epoch starts from random states that depend only on the run's seed
    and the epoch (:func:`seed_epoch`), so a run killed and resumed ends exactly where an uninterrupted
    one does (an epoch cut off midway is redone from its start).

    ``final_filename`` (optional) also receives the bare state dict of ``save_dict["network"]`` at
    completion, the model-zoo ``model.pt`` format.

    ``settings`` (in a bundle ``$medssl.bundles.run_settings(@datalist, seed=@seed)``: every setting of the
    stage but those :data:`medssl.bundles.RESUME_MAY_CHANGE` exempts, and a digest of the datalist) are stored
    in the checkpoint; resuming a checkpoint saved with other settings raises :class:`SettingsMismatchError`
    naming each differing setting (:func:`check_resume_settings`), before any training (``resume=False``
    trains afresh instead, overwriting it). The budget (``max_epochs``) may grow: a resumed run trains on.
    Once that check has passed, the run's record (:func:`medssl.bundles.write_run_record`: every setting of
    the stage, ``run.json``) is written beside the checkpoint. ``settings["seed"]`` (else torch's initial seed
    when the run starts) seeds the epochs.
    """

    def __init__(self, save_dir: str, save_dict: Mapping, filename: str = "checkpoint.pt", save_interval: int = 1,
                 resume: bool = True, final_filename: str | None = None, settings: Mapping | None = None):
        self.settings = _comparable(dict(settings or {}))
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.path = self.save_dir / filename
        self.save_interval = save_interval
        self.resume = resume
        self.final_filename = final_filename
        self.seed = self.settings.get("seed")

    def attach(self, engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seed_epoch(e, self.seed))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.complete)

    def load(self, engine) -> None:
        for stale in remove_stale_temporaries(self.save_dir):  # left by a run killed while writing
            logger.info("removed %s, a temporary file of an interrupted write", stale)
        if self.seed is None:
            self.seed = torch.initial_seed()
        if not (self.resume and self.path.is_file()):
            self._record()
            return
        ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        check_resume_settings(self.path, ckpt.get("settings"), self.settings)
        self._record()
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:  # e.g. written before the curves were saved: start those afresh
            logger.warning("%s holds no %s; those start afresh", self.path, missing)
        max_epochs = engine.state.max_epochs  # this run's budget, not the interrupted run's
        Checkpoint.load_objects(to_load={k: v for k, v in self.save_dict.items() if k in ckpt}, checkpoint=ckpt)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        logger.info("resumed from %s at epoch %d of %d", self.path, engine.state.epoch, engine.state.max_epochs)

    def _record(self) -> None:
        from ..bundles import write_run_record

        write_run_record(self.save_dir, self.settings)

    def save(self, engine) -> None:
        state = {k: (_unwrap(v) if isinstance(v, torch.nn.Module) else v).state_dict() for k, v in self.save_dict.items()}
        atomic_torch_save({**state, "settings": self.settings}, self.path)

    def complete(self, engine) -> None:
        self.save(engine)
        if self.final_filename:
            atomic_torch_save(_unwrap(self.save_dict["network"]).state_dict(), self.save_dir / self.final_filename)
            logger.info("saved %s", self.save_dir / self.final_filename)


class BestModelSaver:
    """Attach to a validation evaluator: save the network's state dict atomically whenever
    ``key_metric`` (in ``engine.state.metrics``) improves. Its best value is kept in
    :meth:`state_dict`, so put the saver in a :class:`ResumableCheckpoint` to resume it too.

    ``save_members``: for a network made of named members (:class:`medssl.networks.PairedNetwork`), also
    save each member alone as ``<stem>_<name>.pt`` (e.g. ``model_t2.pt``: what single-modality inference,
    ``ckpt_export`` and a model zoo load)."""

    def __init__(self, save_dir: str, network: torch.nn.Module, key_metric: str = "val_mean_dice",
                 filename: str = "model.pt", higher_is_better: bool = True, save_members: bool = False):
        self.path = Path(save_dir) / filename
        self.save_members = save_members
        self.network = network
        self.key_metric = key_metric
        self.sign = 1.0 if higher_is_better else -1.0
        self.best = -math.inf
        self.best_epoch = -1

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        value = float(engine.state.metrics[self.key_metric])
        if math.isnan(value):
            value = -math.inf * self.sign
        if self.sign * value > self.best or not self.path.exists():
            self.best = max(self.best, self.sign * value)
            self.best_epoch = int(engine.state.epoch)
            net = _unwrap(self.network)
            if self.save_members:
                for name, member in net.networks.items():
                    atomic_torch_save(_unwrap(member).state_dict(), self.path.with_name(f"{self.path.stem}_{name}.pt"))
            atomic_torch_save(net.state_dict(), self.path)
            logger.info("new best %s=%.4f, saved %s", self.key_metric, value, self.path)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


class EarlyStopping:
    """Attach to a trainer: stop it when ``key_metric`` of its ``validator`` has not improved by more
    than ``min_delta`` for ``patience`` validations (pair it with :class:`BestModelSaver`, which keeps the
    best model). Its counters are in :meth:`state_dict`, so a :class:`ResumableCheckpoint` resumes them,
    and a run that has stopped stays stopped when run again. ``patience=0`` never stops.

    (ignite's ``EarlyStopping`` does the same count, but its constructor sets up a logger through
    ``idist.get_rank()``, which creates a process group: built on rank 0 only, as rank-0 handlers are
    under ``torchrun``, it deadlocks the other ranks.)"""

    def __init__(self, validator, patience: int, key_metric: str = "val_mean_dice", min_delta: float = 0.0):
        self.validator = validator
        self.patience = int(patience)
        self.key_metric = key_metric
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.counter = 0
        self.stopped_epoch = 0
        self.trainer = None

    def attach(self, engine) -> None:
        if self.patience <= 0:
            return
        self.trainer = engine
        self.validator.add_event_handler(Events.COMPLETED, self._check)
        engine.add_event_handler(Events.STARTED, self._stay_stopped)

    def _check(self, validator) -> None:
        value = float(validator.state.metrics[self.key_metric])
        value = -math.inf if math.isnan(value) else value
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.counter = value, 0
            return
        self.counter += 1
        if self.counter >= self.patience and not self.stopped_epoch:
            self.stopped_epoch = int(self.trainer.state.epoch)
            logger.info("early stop at epoch %d: %s has not improved for %d validations", self.stopped_epoch,
                        self.key_metric, self.patience)
            self.trainer.terminate()

    def _stay_stopped(self, engine) -> None:
        if self.stopped_epoch:
            logger.info("stopped early at epoch %d before; not training further", self.stopped_epoch)
            engine.terminate()

    def state_dict(self) -> dict:
        return {"best": self.best, "counter": self.counter, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.counter = int(state.get("counter", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", 0))


class CurveLog(MetricLogger):
    """MONAI's ``MetricLogger`` that also writes its curves to ``output_file`` (JSON, atomically) after every
    epoch: ``{"loss": [[iteration, loss], ...], "metrics": {name: [[iteration, value], ...]}}`` - the training
    loss of every iteration (``keys[0]`` of the engine's output), the other ``keys`` (e.g. the terms of a
    pretext loss) and each of ``terms`` (name -> function of the engine's output, e.g.
    :func:`classification_accuracy`) under ``metrics`` as ``train_<name>``, and the validator's metrics at
    each validation. Put it in a :class:`ResumableCheckpoint` so that a resumed run continues its curves."""

    def __init__(self, output_file: str, evaluator=None, keys: Sequence[str] = ("loss",), terms: Mapping | None = None):
        self.keys = list(keys)
        self.terms = dict(terms or {})
        super().__init__(loss_transform=lambda output: _scalar(output, self.keys[0]), evaluator=evaluator)
        self.output_file = output_file

    def attach(self, engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def __call__(self, engine) -> None:
        super().__call__(engine)
        for key in self.keys[1:]:
            self.metrics[f"train_{key}"].append((self.iteration, _scalar(engine.state.output, key)))
        for name, term in self.terms.items():
            self.metrics[f"train_{name}"].append((self.iteration, float(term(engine.state.output))))

    def write(self, engine=None) -> None:
        def rows(values):
            return [[int(i), None if v is None or not math.isfinite(float(v)) else round(float(v), 6)] for i, v in values]

        atomic_write_json({"loss": rows(self.loss), "metrics": {k: rows(v) for k, v in self.metrics.items()}},
                          self.output_file)


def classification_accuracy(output) -> float:
    """The fraction of the samples in an engine's output (decollated dicts or one batch dict) whose
    ``pred`` logits' argmax is their class ``label`` - a pretext classifier's accuracy for :class:`CurveLog`."""
    items = output if isinstance(output, (list, tuple)) else [output]
    pred = torch.stack([torch.as_tensor(i["pred"]).detach().reshape(-1, torch.as_tensor(i["pred"]).shape[-1])
                        for i in items]).reshape(-1, torch.as_tensor(items[0]["pred"]).shape[-1])
    label = torch.cat([torch.as_tensor(i["label"]).detach().reshape(-1) for i in items])
    return float((pred.argmax(-1) == label.to(pred.device)).float().mean())


def _scalar(output, key: str) -> float:
    """``output[key]`` as a float, from an engine's output (a dict, or a list of decollated dicts)."""
    value = (output[0] if isinstance(output, (list, tuple)) else output)[key]
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Attach to a trainer: stop the run with :class:`NonFiniteLossError` (a non-zero exit) at the first
    iteration whose loss is NaN or infinite, before the epoch's checkpoint, validation or best-model save
    can keep the broken state (ignite's ``TerminateOnNan`` ends the run as a success instead)."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        loss = _scalar(engine.state.output, "loss")
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"the training loss became {loss} at iteration {engine.state.iteration} (epoch "
                                     f"{engine.state.epoch}); stopped without saving this epoch. Expected a finite "
                                     f"loss: lower the learning rate or check the input intensities")


class StepSnapshots:
    """Attach to a trainer: save the network's state dict atomically as ``save_dir/model_step{N}.pt`` after
    iteration N for each N in ``steps`` - the candidates from which a training length is chosen by
    validation afterwards (``medssl benchmark``'s step selection)."""

    def __init__(self, save_dir: str, network: torch.nn.Module, steps: Sequence[int] = ()):
        self.save_dir = Path(save_dir)
        self.network = network
        self.steps = {int(s) for s in steps}

    def attach(self, engine) -> None:
        if self.steps:
            engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=lambda e, i: i in self.steps), self)

    def __call__(self, engine) -> None:
        atomic_torch_save(_unwrap(self.network).state_dict(), self.save_dir / f"model_step{engine.state.iteration}.pt")


class LoadCheckpoint:
    """Attach to an evaluator: before it starts, load ``load_path`` into ``network`` with
    :func:`medssl.networks.load_pretrained` (no head mismatch allowed), so that a missing file or a
    checkpoint of another network stops with one clear message naming the file."""

    def __init__(self, load_path: str, network: torch.nn.Module):
        self.load_path = load_path
        self.network = network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        from ..networks import load_pretrained
        from ..networks.weights import TRAINED

        load_pretrained(_unwrap(self.network), self.load_path, allow_head_mismatch=False, expected=TRAINED)


class EvaluationReport:
    """Base of the report handlers: attached to an evaluator, :meth:`reset` at start, :meth:`_collect`
    after every iteration, and the report written by ``__call__`` at completion."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def reset(self) -> None:
        raise NotImplementedError

    def _collect(self, engine) -> None:
        raise NotImplementedError


class MetricsReport(EvaluationReport):
    """Attach to an evaluator: at completion write ``output_file`` (JSON, atomically) with, for each
    metric whose handler ran with ``save_details=True``, the per-region means over cases, the mean over
    regions (``mean_<metric>``), and per-case values keyed by ``case_key``.

    A region empty in the ground truth or in the prediction of a case is scored as the BraTS challenge
    scores it (MONAI returns NaN or inf there, and a mean that skips them does not penalise a missed or a
    hallucinated region): Dice 1 if both are empty, else 0 when the truth is empty; HD95 0 if both are
    empty, the image diagonal in voxels (the worst possible distance) if exactly one is. This applies
    where the output's channels are the metric's regions (or the background then the regions); the
    report says so in ``empty_regions``.
    """

    def __init__(self, output_file: str, regions: Sequence[str], metrics: Sequence[str] = ("dice", "hd95"),
                 case_key: str = "case", extra: Mapping | None = None,
                 metric_regions: Mapping[str, Sequence[str]] | None = None, aggregate: Sequence[str] = ()):
        """``metric_regions`` names the channels of a metric whose channels differ from ``regions``
        (e.g. an IoU that includes the background); ``aggregate`` lists metrics reported as the
        engine's aggregated value only (e.g. precision from a confusion matrix over the whole set)."""
        self.output_file = output_file
        self.regions = list(regions)
        self.metric_regions = {k: list(v) for k, v in (metric_regions or {}).items()}
        self.aggregate = list(aggregate)
        self.metrics = list(metrics)
        self.case_key = case_key
        self.extra = dict(extra or {})
        self.cases: list[str] = []
        self.empty: list[tuple] = []  # per case: (truth empty per channel, prediction empty per channel, diagonal)

    def reset(self) -> None:
        self.cases.clear()
        self.empty.clear()

    def _collect(self, engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            name = item.get(self.case_key, "?")
            self.cases.extend(name if isinstance(name, (list, tuple)) else [name])
        outputs = engine.state.output if isinstance(engine.state.output, list) else []
        for out in outputs:
            if isinstance(out, dict) and "pred" in out and "label" in out:
                pred, label = torch.as_tensor(out["pred"]).detach(), torch.as_tensor(out["label"]).detach()
                dims = tuple(range(1, label.ndim))
                diagonal = float(torch.tensor([s - 1.0 for s in label.shape[1:]]).norm())
                self.empty.append(((label > 0).sum(dims) == 0, (pred > 0).sum(dims) == 0, diagonal))

    def _score_empty(self, metric: str, values: torch.Tensor) -> bool:
        """Apply the challenge's convention to ``values`` (cases x regions) in place; False where the
        output's channels cannot be matched to the regions."""
        if metric not in ("dice", "hd95") or len(self.empty) != values.shape[0]:
            return False
        n = values.shape[1]
        for row, (truth, pred, diagonal) in zip(values, self.empty):
            if len(truth) not in (n, n + 1):
                return False
            truth, pred = truth[len(truth) - n:], pred[len(pred) - n:]  # the regions: the last n channels
            both, one = truth & pred, truth ^ pred
            if metric == "dice":
                row[both], row[truth & ~pred] = 1.0, 0.0
            else:
                row[both], row[one] = 0.0, diagonal
        return True

    def __call__(self, engine) -> None:
        report: dict = {"num_cases": 0}
        scored = []
        for metric in self.metrics:
            details = engine.state.metric_details.get(metric)
            if details is None:
                continue
            regions = self.metric_regions.get(metric, self.regions)
            values = torch.as_tensor(details, dtype=torch.float64).reshape(-1, len(regions)).clone()
            if self._score_empty(metric, values):
                scored.append(metric)
            values[torch.isinf(values)] = torch.nan
            per_region = values.nanmean(0)
            report["num_cases"] = int(values.shape[0])
            report[metric] = {r: _num(v) for r, v in zip(regions, per_region)}
            report[f"mean_{metric}"] = _num(per_region.nanmean())
            report.setdefault("per_case", [{"case": c} for c in self.cases[: values.shape[0]]])
            for row, vals in zip(report["per_case"], values):
                row[metric] = {r: _num(v) for r, v in zip(regions, vals)}
        for metric in self.aggregate:
            if metric in engine.state.metrics:
                report[metric] = _num(engine.state.metrics[metric])
        report["empty_regions"] = ("BraTS convention for " + ", ".join(scored)) if scored else "skipped (NaN)"
        report.update(self.extra)
        atomic_write_json(report, self.output_file)
        logger.info("metrics: %s -> %s", {k: v for k, v in report.items() if k.startswith("mean_")}, self.output_file)


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 6)
