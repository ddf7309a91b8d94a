"""The two-stream semi-supervised iterations (issue 5) on MONAI's SupervisedTrainer, with small 2D
networks on real BraTS FLAIR/T2 slices (whole tumour)."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import LoadImage

from medssl.data import brats_cases
from medssl.engines import (ChooseStronger, CycledLoader, MeanTeacherIteration, PseudoLabelIteration,
                            SemiCMLIteration, sigmoid_rampup)
from medssl.engines.semi import checkpoint_dict
from medssl.losses import AreaSimilarityContrastiveLoss, MutualLearningLoss
from medssl.networks import PairedNetwork
from medssl.networks.paired import distributed

CHANNELS = {"flair": 0, "t2": 1}


@pytest.fixture(scope="module")
def slices(brats_dir):
    """(image (2, 64, 64): FLAIR, T2 z-normalised; label (1, 64, 64): whole tumour) of the tumour's
    largest axial slice of 6 real cases."""
    load = LoadImage(image_only=True)
    out = []
    for case in brats_cases(brats_dir)[:6]:
        seg = np.asarray(load(case["label"])) > 0
        z = int(seg.sum((0, 1)).argmax())
        cy, cx = (int(v) for v in np.argwhere(seg[..., z]).mean(0))
        y0, x0 = (int(np.clip(c - 32, 0, n - 64)) for c, n in zip((cy, cx), seg.shape[:2]))
        img = []
        for path in (case["image"][0], case["image"][3]):  # flair, t2
            a = np.asarray(load(path))[y0:y0 + 64, x0:x0 + 64, z].astype(np.float32)
            img.append((a - a[a > 0].mean()) / (a[a > 0].std() + 1e-6) * (a > 0))
        lab = seg[y0:y0 + 64, x0:x0 + 64, z][None].astype(np.float32)
        out.append({"image": torch.as_tensor(np.stack(img)), "label": torch.as_tensor(lab), "case": case["case"]})
    return out


def _paired(seed=0):
    torch.manual_seed(seed)
    return PairedNetwork(names=list(CHANNELS), factory=lambda: UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=0))


def _trainer(net, iteration, loader, steps=3):
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=steps, train_data_loader=loader,
                             network=net, optimizer=next(iter(iteration.optimizers.values())),
                             loss_function=DiceCELoss(sigmoid=True), iteration_update=iteration)


def _loaders(slices):
    labelled = DataLoader(slices[:2], batch_size=2, shuffle=True)
    unlabelled = DataLoader([{"image": s["image"], "case": s["case"]} for s in slices], batch_size=2, shuffle=True)
    return labelled, unlabelled


class _Counting:
    """A loader that counts the batches drawn from it."""

    def __init__(self, loader):
        self.loader, self.drawn = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            self.drawn += 1
            yield b


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    return any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_semi_cml_trains_both_networks_on_both_streams(slices):
    net = _paired()
    labelled, unlabelled = _loaders(slices)
    unl = _Counting(unlabelled)
    opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
    before = {m: _params(net.member(m)) for m in CHANNELS}
    it = SemiCMLIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), unl, MutualLearningLoss(),
                          AreaSimilarityContrastiveLoss(grid=2), rampup_iterations=0)
    trainer = _trainer(net, it, labelled, steps=4)
    trainer.run()
    assert unl.drawn == 4  # one unlabelled batch per iteration, cycling past the end of a pass
    assert all(_changed(before[m], net.member(m)) for m in CHANNELS)
    out = trainer.state.output[0]  # decollated like MONAI's own iteration output
    assert {"loss", "supervised_loss", "mutual_loss", "contrastive_loss"} <= set(out)
    assert np.isfinite(float(out["loss"])) and float(out["mutual_loss"]) > 0


class _RecordingASC(AreaSimilarityContrastiveLoss):
    """The contrastive loss, recording the case ids and negative counts of each call."""

    calls: list

    def forward(self, logits_a, logits_b, case_ids=None):
        out = super().forward(logits_a, logits_b, case_ids=case_ids)
        self.calls = getattr(self, "calls", []) + [(list(case_ids), self.last_negatives.tolist())]
        return out


def test_semi_cml_never_contrasts_a_labelled_crop_with_its_own_unlabelled_crop(slices):
    """Every step here draws the same two cases in both streams (the labelled cases are unlabelled cases
    too, as in the bundle's datalists): each of the 4 crops has exactly the 2 crops of the other case as
    negatives, never the crop of its own case from the other stream (before the fix: 3 negatives)."""
    net = _paired()
    labelled = DataLoader(slices[:2], batch_size=2, shuffle=False)
    unlabelled = DataLoader([{"image": s["image"], "case": s["case"]} for s in slices[:2]], batch_size=2)
    opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
    asc = _RecordingASC(grid=2)
    it = SemiCMLIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), unlabelled, MutualLearningLoss(), asc)
    trainer = _trainer(net, it, labelled, steps=2)
    trainer.run()
    cases = [slices[0]["case"], slices[1]["case"]] * 2
    assert asc.calls == [(cases, [2, 2, 2, 2])] * 2
    assert float(trainer.state.output[0]["asc_negatives"]) == 2.0 and float(trainer.state.output[0]["asc_kept"]) == 1.0
    no_ids = DataLoader([{"image": s["image"], "label": s["label"]} for s in slices[:2]], batch_size=2)
    it = SemiCMLIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), unlabelled, MutualLearningLoss(), asc)
    with pytest.raises(ValueError, match="'case' key"):
        _trainer(net, it, no_ids, steps=1).run()


def test_prel_equal_step_control_trains_the_same_student_on_labels_only(slices):
    """``pseudo_weight=0`` (the benchmark's equal-step control of PReL): the same student and teacher, the same
    steps, but no pseudo-label term - the unlabelled stream is never drawn and the teacher stays frozen."""
    net = _paired()
    labelled, unlabelled = _loaders(slices)
    unl = _Counting(unlabelled)
    opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
    before = {m: _params(net.member(m)) for m in CHANNELS}
    it = PseudoLabelIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), DiceCELoss(sigmoid=True), unl,
                              pseudo_weight=0.0, teacher="t2")
    trainer = _trainer(net, it, labelled, steps=3)
    trainer.run()
    assert unl.drawn == 0 and trainer.state.iteration == 3 and list(it.optimizers) == ["flair"]
    assert not _changed(before["t2"], net.member("t2")) and _changed(before["flair"], net.member("flair"))
    out = trainer.state.output[0]
    assert float(out["pseudo_loss"]) == 0 and float(out["loss"]) == pytest.approx(float(out["supervised_loss"]))


def test_supervised_only_never_touches_the_unlabelled_stream(slices):
    class Refuses:
        def __len__(self):
            return 1

        def __iter__(self):
            raise AssertionError("the supervised reference drew an unlabelled batch")

    net = _paired()
    labelled, _ = _loaders(slices)
    opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
    before = {m: _params(net.member(m)) for m in CHANNELS}
    it = SemiCMLIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), Refuses(), MutualLearningLoss(),
                          AreaSimilarityContrastiveLoss(), mutual_weight=0.0, contrastive_weight=0.0)
    _trainer(net, it, labelled).run()
    assert all(_changed(before[m], net.member(m)) for m in CHANNELS)


def test_semi_cml_needs_two_networks():
    with pytest.raises(ValueError, match="exactly two networks"):
        SemiCMLIteration({"flair": 0}, {}, DiceCELoss(sigmoid=True))


def test_mean_teacher_is_an_exponential_moving_average_of_the_student(slices):
    net = _paired()
    labelled, unlabelled = _loaders(slices)
    opts = net.optimizers(lambda p: torch.optim.SGD(p, 0.1))
    start = {m: _params(net.member(m)) for m in CHANNELS}
    it = MeanTeacherIteration(CHANNELS, opts, net, DiceCELoss(sigmoid=True), unlabelled, ema_decay=0.99)
    _trainer(net, it, labelled, steps=1).run()
    for m in CHANNELS:  # after iteration 1: a = min(1 - 1/2, 0.99) = 0.5
        student, teacher = net.member(m).state_dict(), it.teachers[m].state_dict()
        for k, p in net.member(m).named_parameters():
            torch.testing.assert_close(teacher[k], 0.5 * start[m][k] + 0.5 * student[k])
        assert _changed(start[m], net.member(m))


def test_pseudo_label_relearning_trains_only_the_student(slices):
    net = _paired()
    labelled, unlabelled = _loaders(slices)
    opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
    before = {m: _params(net.member(m)) for m in CHANNELS}
    it = PseudoLabelIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), DiceCELoss(sigmoid=True), unlabelled)
    with pytest.raises(RuntimeError, match="no teacher"):
        _trainer(net, it, labelled, steps=1).run()
    with pytest.raises(ValueError, match="teacher must be one of"):
        it.set_teacher("t1")
    it.set_teacher("t2")
    assert it.student == "flair" and list(it.optimizers) == ["flair"]
    _trainer(net, it, labelled).run()
    assert not _changed(before["t2"], net.member("t2")), "the teacher must stay frozen"
    assert _changed(before["flair"], net.member("flair"))


class _Threshold(nn.Module):
    """A fixed 'network': tumour where the input exceeds ``t`` (FLAIR is bright in the whole tumour);
    ``t=inf`` predicts nothing."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x > self.t).float() * 20 - 10 + 0 * self.dummy


def test_choose_stronger_picks_the_network_with_the_higher_validation_dice(slices, tmp_path):
    paired = PairedNetwork({"flair": _Threshold(1.0), "t2": _Threshold(float("inf"))})
    val = [{"image": s["image"], "label": s["label"].repeat(2, 1, 1)} for s in slices]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(val, batch_size=1), network=paired,
        key_val_metric={"val_mean_dice": MeanDice(include_background=True, save_details=True,
                                                  output_transform=lambda o: ([(x["pred"] > 0).float() for x in o],
                                                                              [x["label"] for x in o]))})
    # a PReL trainer whose first step is never reached: the handler decides at STARTED
    it = PseudoLabelIteration(CHANNELS, {m: torch.optim.SGD(paired.member(m).parameters(), 0.0) for m in CHANNELS},
                              DiceCELoss(sigmoid=True), DiceCELoss(sigmoid=True))
    choose = ChooseStronger(evaluator, it, list(CHANNELS), output_file=str(tmp_path / "choice.json"))
    choose(None)
    saved = json.loads((tmp_path / "choice.json").read_text())
    assert it.teacher == "flair" and it.student == "t2" and saved["teacher"] == "flair"
    assert saved["validation_dice"]["flair"] > 0.3 and saved["validation_dice"]["t2"] == 0.0
    # a resumed run keeps the first choice without evaluating again
    other = copy.copy(it)
    other.teacher = None
    ChooseStronger(None, other, list(CHANNELS), output_file=str(tmp_path / "choice.json"))(None)
    assert other.teacher == "flair"


def test_cycled_loader_and_rampup():
    cyc = CycledLoader(DataLoader(list(range(3)), batch_size=2))
    assert [int(b[0]) for b in (next(cyc) for _ in range(5))] == [0, 2, 0, 2, 0] and cyc.passes == 2
    with pytest.raises(ValueError, match="unlabelled data loader is empty"):
        CycledLoader(DataLoader([], batch_size=1))
    assert sigmoid_rampup(0, 10) == pytest.approx(np.exp(-5)) and sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(5, 0) == 1.0 and sigmoid_rampup(3, 10) < sigmoid_rampup(6, 10)


def test_checkpoint_dict_holds_every_network_state_and_the_mean_teachers(tmp_path):
    """The resumable checkpoint of the semi_cml configs: one optimiser and scheduler per member, named by
    the member, and the EMA teachers only for the mean teacher; saved and loaded into fresh objects,
    every piece of state comes back."""
    def setup(seed):
        net = _paired(seed)
        opts = net.optimizers(lambda p: torch.optim.Adam(p, 1e-3))
        scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in opts.values()]
        return net, opts, scheds, MeanTeacherIteration(CHANNELS, opts, net, DiceCELoss(sigmoid=True))

    net, opts, scheds, mt = setup(0)
    best = nn.Linear(1, 1)  # stands for the best-model saver: any object with a state dict
    cml = SemiCMLIteration(CHANNELS, opts, DiceCELoss(sigmoid=True), None, MutualLearningLoss(),
                           AreaSimilarityContrastiveLoss())
    keys = ["network", "best_model", "optimizer_flair", "optimizer_t2", "lr_scheduler_flair", "lr_scheduler_t2"]
    assert list(checkpoint_dict(net, best, opts, scheds, cml)) == keys
    assert list(checkpoint_dict(net, best, opts, scheds)) == keys
    saved = checkpoint_dict(net, best, opts, scheds, mt)
    assert list(saved) == keys + ["teachers"] and saved["teachers"] is mt.teachers
    assert saved["optimizer_t2"] is opts["t2"] and saved["lr_scheduler_t2"] is scheds[1]
    with torch.no_grad():
        for p in mt.teachers.parameters():
            p.add_(1.0)  # teachers that differ from their students
    opts["flair"].step()  # no gradients: no change, but the scheduler may step after it
    scheds[0].step()
    torch.save({k: v.state_dict() for k, v in saved.items()}, tmp_path / "ckpt.pt")
    net2, opts2, scheds2, mt2 = setup(1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for k, v in checkpoint_dict(net2, nn.Linear(1, 1), opts2, scheds2, mt2).items():
        v.load_state_dict(state[k])
    assert not _changed(_params(net), net2) and not _changed(_params(mt.teachers), mt2.teachers)
    assert scheds2[0].last_epoch == 1 and scheds2[1].last_epoch == 0
    with pytest.raises(ValueError, match="one per network"):
        checkpoint_dict(net, best, opts, scheds[:1])


def test_distributed_wraps_each_member_in_its_own_ddp(tmp_path):
    """multi_gpu_train's network: the same members, each behind DistributedDataParallel (a one-process
    gloo group here), computing what the plain pair computes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    net = _paired()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        expected = net(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = distributed(net, torch.device("cpu"))
        assert isinstance(wrapped, PairedNetwork) and wrapped.names == net.names
        for m in CHANNELS:
            assert isinstance(wrapped.member(m), DistributedDataParallel) and wrapped.member(m).module is net.member(m)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), expected)
    finally:
        dist.destroy_process_group()
