"""Semi-supervised training with several networks on MONAI's ``SupervisedTrainer``.

The trainer iterates over the *labelled* loader as usual; the ``iteration_update`` objects here also
draw one batch per iteration from an *unlabelled* loader (cycled endlessly, independent of the epoch
length), run several named networks - each with its own optimiser - and step all of them:

- :class:`SemiCMLIteration`: one network per modality, supervised Dice+CE on the labelled batch plus
  mutual learning and the area-similarity contrastive loss on labelled + unlabelled cases (Semi-CML,
  Zhang et al., Med Image Anal 2023). With both unsupervised weights 0 it is the supervised-only
  reference: the same networks, data and steps, labels only.
- :class:`MeanTeacherIteration`: per modality, a student and its exponential-moving-average teacher
  with a consistency loss on noisy unlabelled inputs (Tarvainen & Valpola, NeurIPS 2017): the
  standard semi-supervised baseline, on the same engine.
- :class:`PseudoLabelIteration`: pseudo-label re-learning (PReL): a frozen teacher network produces
  soft pseudo-labels on the unlabelled cases from its own modality and the student network (another
  modality) re-learns from them plus its labelled cases. :class:`ChooseStronger` picks the teacher
  by validation Dice when the run starts.

The trainer's ``network`` is a :class:`medssl.networks.PairedNetwork` (or a ``ModuleDict``) of the named
networks - checkpoints, evaluators and handlers see one module - and its ``optimizer`` the first
network's optimiser; the iteration holds them all. ``engine.state.output`` carries ``loss``, its components and ``pred`` (the first network's
labelled logits) like MONAI's own iteration.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from monai.engines.utils import IterationEvents

from .handlers import _unwrap
from .iteration import autocast, optimise

logger = logging.getLogger(__name__)


def sigmoid_rampup(iteration: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = iteration / length`` clipped to [0, 1] (Laine & Aila 2017);
    1 when ``length <= 0``. The usual warm-up of the unsupervised weights."""
    if length <= 0:
        return 1.0
    t = min(max(iteration / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class CycledLoader:
    """Endless iterator over a data loader: a new pass (with a new shuffle, and ``set_epoch`` on a
    ``DistributedSampler``) starts whenever one ends."""

    def __init__(self, loader):
        if len(loader) == 0:
            raise ValueError("the unlabelled data loader is empty (no unlabelled case, or fewer cases than one "
                             "batch with drop_last)")
        self.loader, self.passes, self._it = loader, 0, None

    def __iter__(self):
        return self

    def restart(self, epoch: int) -> None:
        """Start a new pass at the next batch, numbered from ``epoch`` (a ``DistributedSampler``'s shuffle
        depends on the pass number: this keeps it a function of the epoch, as a resumed run needs)."""
        self._it, self.passes = None, int(epoch) << 16

    def __next__(self):
        if self._it is None:
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.passes)
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._it, self.passes = None, self.passes + 1
            return next(self)


class TwoStreamIteration:
    """Base ``iteration_update``: labelled batch (the trainer's) + unlabelled batch, named networks.

    Args:
        channels: network name -> the channel of the batch image that is its input (e.g.
            ``{"flair": 0, "t2": 1}`` for an image stacking the two modalities: both networks then see
            exactly the same crop); the names index the trainer's ``ModuleDict`` network.
        optimizers: network name -> its optimiser (networks without one are not trained here).
        unlabelled_loader: loader of the unlabelled stream (its batches need the same image layout); None
            when the subclass does not use one.
        image_key, label_key: the batch keys.
        case_key: the batch key of each crop's case id (a datalist's ``case``), where a loss needs it.
        rampup_iterations: warm-up length of the unsupervised weights (:func:`sigmoid_rampup`).
    """

    uses_unlabelled = True
    terms: tuple[str, ...] = ()  # the loss terms of ``engine.state.output`` besides ``loss``, for the curves

    def __init__(self, channels: Mapping[str, int], optimizers: Mapping[str, torch.optim.Optimizer],
                 unlabelled_loader=None, image_key: str = "image", label_key: str = "label",
                 rampup_iterations: int = 0, case_key: str = "case"):
        self.image_keys = {name: int(c) for name, c in channels.items()}
        self.image_key = image_key
        self.case_key = case_key
        self.cases: list[str] | None = None
        unknown = sorted(set(optimizers) - set(self.image_keys))
        if unknown:
            raise ValueError(f"optimisers for unknown networks {unknown}; networks: {sorted(self.image_keys)}")
        self.optimizers = dict(optimizers)
        self.label_key = label_key
        self.rampup_iterations = int(rampup_iterations)
        self.unlabelled = CycledLoader(unlabelled_loader) if unlabelled_loader is not None and self.uses_unlabelled else None

    def weight(self, engine) -> float:
        return sigmoid_rampup(engine.state.iteration, self.rampup_iterations)

    @property
    def extra_loaders(self) -> list:
        """The loaders this iteration draws from besides the trainer's (the unlabelled stream's)."""
        return [self.unlabelled.loader] if self.unlabelled is not None else []

    def start_epoch(self, epoch: int) -> None:
        """Called by :func:`medssl.engines.seed_epoch` at each epoch's start: the unlabelled stream starts a
        new pass too, so an epoch's unlabelled batches do not depend on where the last epoch left it."""
        if self.unlabelled is not None:
            self.unlabelled.restart(epoch)

    @property
    def curve_keys(self) -> list[str]:
        """``["loss", *terms]``: the output keys a :class:`medssl.engines.CurveLog` logs for this iteration."""
        return ["loss", *self.terms]

    def case_ids(self, labelled: dict, unlabelled: dict | None) -> list[str] | None:
        """The case of every crop of the iteration, labelled then unlabelled (``case_key`` of the batches, one
        entry per crop), or None where a batch has no ``case_key``."""
        out = []
        for batch in (labelled, unlabelled):
            if batch is None:
                continue
            if self.case_key not in batch:
                return None
            ids = batch[self.case_key]
            out.extend([ids] if isinstance(ids, (str, int)) else [str(i) for i in ids])
        return out

    def inputs(self, batch: dict, device) -> dict[str, torch.Tensor]:
        image = batch[self.image_key].to(device)
        return {name: image[:, c : c + 1] for name, c in self.image_keys.items()}

    def losses(self, engine, nets, labelled: dict, label: torch.Tensor, unlabelled: dict | None) -> dict:
        raise NotImplementedError

    def __call__(self, engine, batchdata: dict) -> dict:
        device = engine.state.device
        nets = _unwrap(engine.network)
        nets = getattr(nets, "networks", nets)  # a PairedNetwork or a ModuleDict
        labelled, label = self.inputs(batchdata, device), batchdata[self.label_key].to(device)
        ubatch = next(self.unlabelled) if self.unlabelled is not None else None
        unlabelled = self.inputs(ubatch, device) if ubatch is not None else None
        self.cases = self.case_ids(batchdata, ubatch)
        out = engine.state.output = {"label": label}
        for name in self.optimizers:
            nets[name].train()
            self.optimizers[name].zero_grad(set_to_none=True)
        with autocast(engine):
            out.update(self.losses(engine, nets, labelled, label, unlabelled))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        result = optimise(engine, out, list(self.optimizers.values()))
        self.after_step(engine, nets)
        return result

    def after_step(self, engine, nets) -> None:
        """Hook after the optimisers stepped (the mean teacher's EMA update)."""


class SemiCMLIteration(TwoStreamIteration):
    """Contrastive mutual learning of two networks, one per modality (Semi-CML).

    ``loss = sum_m supervised(f_m(x_m^L), y) + w(t) * (mutual_weight * mutual(f_A(x_A), f_B(x_B))
    + contrastive_weight * contrastive(f_A(x_A), f_B(x_B)))``, the last two on the labelled and the
    unlabelled cases of the iteration together (labels unused there); ``w(t)`` is the sigmoid ramp-up.
    Both weights 0 (or no ``unlabelled_loader``) trains the two networks on labels only.

    The contrastive loss gets the case id of every crop (``case_key`` of both batches: crops of one case
    are never negatives of each other, :class:`medssl.losses.AreaSimilarityContrastiveLoss`); a batch
    without it stops with an error. ``asc_negatives`` (mean negatives per crop) and ``asc_kept`` (the
    fraction of crops with enough negatives) are in the output for the curves.
    """

    def __init__(self, channels, optimizers, supervised_loss: nn.Module, unlabelled_loader=None,
                 mutual_loss: nn.Module | None = None, contrastive_loss: nn.Module | None = None,
                 mutual_weight: float = 1.0, contrastive_weight: float = 0.1, image_key: str = "image",
                 label_key: str = "label", rampup_iterations: int = 0, case_key: str = "case"):
        if len(channels) != 2:
            raise ValueError(f"Semi-CML trains exactly two networks (one per modality), got {list(channels)}")
        self.mutual_weight = float(mutual_weight) if mutual_loss is not None else 0.0
        self.contrastive_weight = float(contrastive_weight) if contrastive_loss is not None else 0.0
        self.uses_unlabelled = bool(self.mutual_weight or self.contrastive_weight)
        super().__init__(channels, optimizers, unlabelled_loader, image_key, label_key, rampup_iterations, case_key)
        self.supervised_loss, self.mutual_loss, self.contrastive_loss = supervised_loss, mutual_loss, contrastive_loss
        self.terms = ("supervised_loss", *(["mutual_loss"] if self.mutual_weight else []),
                      *(["contrastive_loss", "asc_negatives", "asc_kept"] if self.contrastive_weight else []))

    def losses(self, engine, nets, labelled, label, unlabelled):
        a, b = self.image_keys
        n = label.shape[0]
        x = {m: labelled[m] if unlabelled is None else torch.cat([labelled[m], unlabelled[m]]) for m in (a, b)}
        logits = {m: nets[m](x[m]) for m in (a, b)}
        sup = sum(self.supervised_loss(logits[m][:n], label) for m in (a, b))
        out = {"pred": logits[a][:n], "supervised_loss": sup}
        zero = torch.zeros((), device=label.device)
        mutual = self.mutual_loss(logits[a], logits[b]) if self.mutual_weight else zero
        negatives = kept = zero
        if self.contrastive_weight:
            if self.cases is None:
                raise ValueError(f"the contrastive loss needs the case of every crop, but a batch has no "
                                 f"{self.case_key!r} key; expected datalist items with {self.case_key!r} (crops of one "
                                 f"case must never be negatives of each other)")
            contrast = self.contrastive_loss(logits[a], logits[b], case_ids=self.cases)
            counts = getattr(self.contrastive_loss, "last_negatives", None)
            if counts is not None:
                negatives = counts.float().mean()
                kept = (counts >= max(getattr(self.contrastive_loss, "min_negatives", 1), 1)).float().mean()
        else:
            contrast = zero
        w = self.weight(engine)
        out.update(loss=sup + w * (self.mutual_weight * mutual + self.contrastive_weight * contrast),
                   mutual_loss=mutual, contrastive_loss=contrast, unsupervised_weight=torch.tensor(w),
                   asc_negatives=negatives, asc_kept=kept)
        return out


class MeanTeacherIteration(TwoStreamIteration):
    """Mean teacher per network: ``supervised(student(x^L), y) + w(t) * consistency_weight *
    mse(sigmoid(student(x^U + n1)), sigmoid(teacher(x^U + n2)))`` with Gaussian input noise ``n`` of
    ``noise_std``; after each step ``teacher = a * teacher + (1 - a) * student`` with
    ``a = min(1 - 1 / (iteration + 1), ema_decay)``. The teachers (``self.teachers``, a ``ModuleDict``
    to add to the checkpoint) start as copies of the students."""

    def __init__(self, channels, optimizers, networks: Mapping[str, nn.Module], supervised_loss: nn.Module,
                 unlabelled_loader=None, consistency_weight: float = 1.0, ema_decay: float = 0.99,
                 noise_std: float = 0.1, image_key: str = "image", label_key: str = "label",
                 rampup_iterations: int = 0):
        super().__init__(channels, optimizers, unlabelled_loader, image_key, label_key, rampup_iterations)
        self.supervised_loss = supervised_loss
        self.terms = ("supervised_loss", "consistency_loss")
        self.consistency_weight, self.ema_decay, self.noise_std = float(consistency_weight), float(ema_decay), float(noise_std)
        members = getattr(_unwrap(networks), "networks", networks)
        self.teachers = nn.ModuleDict({m: copy.deepcopy(members[m]) for m in self.image_keys})
        for p in self.teachers.parameters():
            p.requires_grad_(False)

    def losses(self, engine, nets, labelled, label, unlabelled):
        n = label.shape[0]
        sup, cons = 0.0, torch.zeros((), device=label.device)
        first = next(iter(self.image_keys))
        out = {}
        for m in self.image_keys:
            if unlabelled is None:
                logits = nets[m](labelled[m])
            else:
                u = unlabelled[m]
                logits = nets[m](torch.cat([labelled[m], u + self.noise_std * torch.randn_like(u)]))
                teacher = self.teachers[m].to(u.device).train()
                with torch.no_grad():
                    target = torch.sigmoid(teacher(u + self.noise_std * torch.randn_like(u)))
                cons = cons + torch.mean((torch.sigmoid(logits[n:]) - target) ** 2)
            sup = sup + self.supervised_loss(logits[:n], label)
            if m == first:
                out["pred"] = logits[:n]
        w = self.weight(engine)
        out.update(loss=sup + w * self.consistency_weight * cons, supervised_loss=sup, consistency_loss=cons,
                   unsupervised_weight=torch.tensor(w))
        return out

    @torch.no_grad()
    def after_step(self, engine, nets) -> None:
        a = min(1.0 - 1.0 / (engine.state.iteration + 1), self.ema_decay)
        for m in self.image_keys:
            for t, s in zip(self.teachers[m].parameters(), nets[m].parameters()):
                t.mul_(a).add_(s.detach(), alpha=1.0 - a)
            for t, s in zip(self.teachers[m].buffers(), nets[m].buffers()):
                t.copy_(s)


class PseudoLabelIteration(TwoStreamIteration):
    """Pseudo-label re-learning (PReL): the ``teacher`` network, frozen, predicts soft pseudo-labels
    ``sigmoid(teacher(x_T^U))`` on the unlabelled cases from its own modality; the other network
    (the student) minimises ``supervised(student(x_S^L), y) + pseudo_weight * pseudo(student(x_S^U),
    pseudo-labels)``. ``teacher`` may be set later (:class:`ChooseStronger` does, by validation Dice);
    only the student's optimiser steps.

    ``pseudo_weight=0`` is PReL's equal-step control: the same student, chosen the same way from the same
    networks, trained for the same steps on its labelled cases only (the unlabelled stream and the
    teacher's forward pass are then skipped)."""

    def __init__(self, channels, optimizers, supervised_loss: nn.Module, pseudo_loss: nn.Module,
                 unlabelled_loader=None, pseudo_weight: float = 1.0, teacher: str | None = None,
                 image_key: str = "image", label_key: str = "label", rampup_iterations: int = 0):
        self.uses_unlabelled = bool(float(pseudo_weight))
        super().__init__(channels, optimizers, unlabelled_loader, image_key, label_key, rampup_iterations)
        self.all_optimizers = dict(optimizers)
        self.supervised_loss, self.pseudo_loss, self.pseudo_weight = supervised_loss, pseudo_loss, float(pseudo_weight)
        self.terms = ("supervised_loss", *(["pseudo_loss"] if self.pseudo_weight else []))
        self.teacher: str | None = None
        if teacher is not None:
            self.set_teacher(teacher)

    @property
    def student(self) -> str:
        return next(m for m in self.image_keys if m != self.teacher)

    def set_teacher(self, teacher: str) -> None:
        if teacher not in self.image_keys:
            raise ValueError(f"teacher must be one of {list(self.image_keys)}, got {teacher!r}")
        self.teacher = teacher
        self.optimizers = {self.student: self.all_optimizers[self.student]}

    def losses(self, engine, nets, labelled, label, unlabelled):
        if self.teacher is None:
            raise RuntimeError("PseudoLabelIteration has no teacher: set one, or attach ChooseStronger")
        s, t = self.student, self.teacher
        n = label.shape[0]
        if unlabelled is None:
            logits = nets[s](labelled[s])
            pseudo = torch.zeros((), device=label.device)
        else:
            nets[t].eval()
            with torch.no_grad():
                target = torch.sigmoid(nets[t](unlabelled[t]))
            logits = nets[s](torch.cat([labelled[s], unlabelled[s]]))
            pseudo = self.pseudo_loss(logits[n:], target)
        sup = self.supervised_loss(logits[:n], label)
        w = self.weight(engine)
        return {"pred": logits[:n], "loss": sup + w * self.pseudo_weight * pseudo, "supervised_loss": sup,
                "pseudo_loss": pseudo, "unsupervised_weight": torch.tensor(w)}


class ChooseStronger:
    """At the start of a :class:`PseudoLabelIteration` run, evaluate every network on the validation
    cases and make the one with the higher Dice the teacher (the paper's stronger modality, chosen by
    measurement, not by assumption); the choice and the Dice values are logged and written to
    ``output_file`` (JSON) when given.

    Args:
        evaluator: a MONAI evaluator whose key metric saves per-channel details (``save_details``) in
            the channel order of ``names`` (e.g. :class:`medssl.networks.PairedNetwork` outputs).
        iteration: the trainer's :class:`PseudoLabelIteration`.
        names: network names in the evaluator's channel order.
    """

    def __init__(self, evaluator, iteration: PseudoLabelIteration, names: Sequence[str], metric: str | None = None,
                 output_file: str | None = None):
        self.evaluator, self.iteration, self.names = evaluator, iteration, list(names)
        self.metric, self.output_file = metric, output_file

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        import json
        from pathlib import Path

        if self.output_file and Path(self.output_file).is_file():  # a resumed run keeps its first choice
            self.iteration.set_teacher(json.loads(Path(self.output_file).read_text())["teacher"])
            return
        self.evaluator.run()
        metric = self.metric or self.evaluator.state.key_metric_name
        details = self.evaluator.state.metric_details[metric]
        per_network = torch.nanmean(torch.as_tensor(details, dtype=torch.float64), dim=0)
        dice = {m: round(float(v), 6) for m, v in zip(self.names, per_network)}
        teacher = max(dice, key=dice.get)
        self.iteration.set_teacher(teacher)
        logger.info(f"PReL: validation Dice {dice}: teacher {teacher}, student {self.iteration.student}")
        if self.output_file:
            from ..utils import atomic_write_json

            atomic_write_json({"validation_dice": dice, "teacher": teacher, "student": self.iteration.student},
                              self.output_file)


def checkpoint_dict(network: nn.Module, best_model, optimizers: Mapping[str, torch.optim.Optimizer],
                    lr_schedulers: Sequence, iteration=None, **others) -> dict:
    """The ``save_dict`` of a resumable checkpoint of the several-network engines here: the
    :class:`~medssl.networks.PairedNetwork` (``network``), the best-model saver (``best_model``), each
    network's optimiser and learning-rate scheduler (``optimizer_<name>``, ``lr_scheduler_<name>``;
    ``lr_schedulers`` in the order of ``optimizers``) and, when the ``iteration`` keeps networks of its
    own (the teachers of :class:`MeanTeacherIteration`), those as ``teachers``, and its contrastive loss where
    that holds state (the memory bank of :class:`medssl.losses.AreaSimilarityContrastiveLoss`) as
    ``contrastive_loss``, plus ``others`` (e.g. the early stopping and curve handlers), so that a resumed
    run continues every piece of state."""
    if len(lr_schedulers) != len(optimizers):
        raise ValueError(f"{len(optimizers)} optimisers ({', '.join(optimizers)}) but {len(lr_schedulers)} "
                         "learning-rate schedulers; expected one per network")
    teachers = getattr(iteration, "teachers", None)
    contrastive = getattr(iteration, "contrastive_loss", None)
    stateful = getattr(contrastive, "queue_size", 0) and getattr(iteration, "contrastive_weight", 0)
    return dict(network=network, best_model=best_model, **{f"optimizer_{m}": o for m, o in optimizers.items()},
                **{f"lr_scheduler_{m}": s for m, s in zip(optimizers, lr_schedulers)},
                **({"teachers": teachers} if teachers is not None else {}),
                **({"contrastive_loss": contrastive} if stateful else {}), **others)


def keep_networks(checkpoint: str, ckpt_dir: str) -> str:
    """What the PReL stage does when the datalist has no unlabelled case (e.g. 100% labels): there is
    nothing to pseudo-label, so the contrastive-mutual-learning networks are kept unchanged - the
    checkpoint and its per-member files (``model.pt``, ``model_<name>.pt``, the step snapshots
    ``model_step<N>.pt``) and its ``train_curve.json`` copied atomically into ``ckpt_dir``, so that a
    training length chosen on validation picks the same model - with a warning instead of an error, so that a pipeline train -> prel -> evaluate runs
    at every label fraction."""
    import shutil
    from pathlib import Path

    from ..utils import atomic_write

    src = Path(checkpoint)
    logger.warning(f"PReL: the datalist has no unlabelled training case, so there is nothing to re-learn from; "
                   f"keeping the networks of {src} unchanged -> {ckpt_dir}")
    curve = [src.parent / "train_curve.json"] if (src.parent / "train_curve.json").is_file() else []
    # the checkpoint and every other model file beside it (members, step snapshots): the benchmark may start
    # PReL from a snapshot and evaluate the best-validation model, or the reverse
    kept = {src, *src.parent.glob("model*.pt")}
    for f in [*sorted(kept), *curve]:
        atomic_write(Path(ckpt_dir) / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
    return str(Path(ckpt_dir) / src.name)
