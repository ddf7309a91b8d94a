"""Barlow Twins pieces of the dfr_barlow method (issue 3): two views, projector net, trainer iteration."""

import pytest
import torch

from monai.engines import SupervisedTrainer
from monai.losses import BarlowTwinsLoss
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandSpatialCropd

from medssl.engines.barlow_twins import BarlowTwinsIteration, BarlowTwinsNet, barlow_terms, redundancy_floor
from medssl.networks import DFRUNet
from medssl.transforms.views import RandTwoViewsd


def test_two_views_are_independent_augmentations_and_reproducible():
    aug = Compose([RandSpatialCropd("image", (16, 16), random_size=False), RandFlipd("image", prob=0.5),
                   RandGaussianNoised("image", prob=1.0, std=0.1)])
    x = {"image": torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32)}
    out = RandTwoViewsd("image", aug).set_random_state(0)(x)
    assert out["view1"].shape == out["view2"].shape == (1, 16, 16)
    assert not torch.equal(out["view1"], out["view2"])
    assert torch.equal(out["image"], x["image"])
    again = RandTwoViewsd("image", aug).set_random_state(0)(x)
    assert torch.equal(again["view1"], out["view1"]) and torch.equal(again["view2"], out["view2"])


def test_barlow_twins_iteration_trains_the_backbone():
    torch.manual_seed(0)
    net = BarlowTwinsNet(DFRUNet(2, 1, 2, channels=(8, 16, 32)), in_features=32, projector_dims=(64, 64))
    data = [{"view1": torch.randn(4, 1, 32, 32), "view2": torch.randn(4, 1, 32, 32)} for _ in range(3)]
    before = [p.detach().clone() for p in net.backbone.parameters()]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=net,
                                optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=BarlowTwinsLoss(),
                                iteration_update=BarlowTwinsIteration(batch_size=4))
    trainer.run()
    assert trainer.state.iteration == 6 and torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))


def test_batch_size_one_is_refused_before_training():
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsIteration(batch_size=1)


class _Features(torch.nn.Module):
    """A stand-in backbone whose ``encode`` is the identity: the projector alone maps fixed features."""

    def encode(self, x):
        return x


def _shipped_pretraining(layout_dataset: str) -> dict:
    """The shipped pretraining's samples per step and projector size, as the bundle's configs resolve them."""
    from monai.bundle import ConfigParser

    from medssl.bundles import bundle_path, stage_config_files

    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(bundle_path("dfr_barlow"), "pretrain")])
    parser["dataset_name"] = layout_dataset
    return {k: parser.get_parsed_content(k) for k in ("batch_size", "loader_batch_size", "crops_per_image",
                                                      "projector_dims", "barlow_lambda")}


@pytest.mark.parametrize("dataset", ["dsb2018_nuclei", "brats18_2mm"])
def test_shipped_pretraining_has_more_samples_per_step_than_projector_dimensions(dataset):
    """The centred batch of N samples has rank <= N - 1, so a D-dimensional cross-correlation can reach the
    identity only if D <= N - 1 (the old 16 images x 512-d projector could not)."""
    cfg = _shipped_pretraining(dataset)
    samples = cfg["loader_batch_size"] * cfg["crops_per_image"]
    assert samples == cfg["batch_size"], "the loader must deliver batch_size samples per step"
    assert cfg["projector_dims"][-1] <= samples - 1, cfg
    assert redundancy_floor(samples, cfg["projector_dims"][-1]) == 0.0
    assert redundancy_floor(16, 512) > 512 / cfg["barlow_lambda"] / 30  # the old setting: an unreachable floor


def test_shipped_projector_cross_correlation_reaches_the_identity_on_a_fixed_batch():
    """Numerically: with the shipped samples per step N and projector size D, Adam on one fixed batch drives
    both Barlow Twins terms to ~0 (C ~ identity, rank D); with the old 16 samples and 512 dimensions the
    cross-correlation's rank stays <= 15 whatever the weights."""
    cfg = _shipped_pretraining("dsb2018_nuclei")
    n, d = cfg["batch_size"], cfg["projector_dims"][-1]
    torch.manual_seed(0)
    h = torch.randn(n, 256, 1, 1)
    v1, v2 = h + 0.1 * torch.randn_like(h), h + 0.1 * torch.randn_like(h)
    net = BarlowTwinsNet(_Features(), 256, cfg["projector_dims"])
    opt, loss = torch.optim.Adam(net.parameters(), 1e-3), BarlowTwinsLoss(lambd=cfg["barlow_lambda"])
    start = barlow_terms(net(v1), net(v2))
    for _ in range(150):
        opt.zero_grad()
        loss(net(v1), net(v2)).backward()
        opt.step()
    on, off = barlow_terms(net(v1), net(v2))
    assert float(start[1]) > 1.0 and float(on) < 0.05 and float(off) < 0.05, (start, on, off)
    z1, z2 = net(v1).detach(), net(v2).detach()
    c = ((z1 - z1.mean(0)) / z1.std(0)).T @ ((z2 - z2.mean(0)) / z2.std(0)) / n
    assert torch.linalg.matrix_rank(c) == d
    old = BarlowTwinsNet(_Features(), 256, (512, 512))
    z1, z2 = old(v1[:16]).detach(), old(v2[:16]).detach()
    c = ((z1 - z1.mean(0)) / z1.std(0)).T @ ((z2 - z2.mean(0)) / z2.std(0)) / 16
    on_old, off_old = barlow_terms(z1, z2)
    assert torch.linalg.matrix_rank(c) <= 15  # so ||C||^2 >= tr(C)^2 / 15: far from the identity's 512
    assert float(off_old) >= float(torch.trace(c)) ** 2 / 15 - float((torch.diagonal(c) ** 2).sum()) - 1e-2 > 1000


def test_iteration_outputs_both_terms_and_warns_about_an_unreachable_identity(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="medssl.engines.barlow_twins"):
        BarlowTwinsIteration(batch_size=16, projector_dim=512)
    assert "cannot reach the identity" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medssl.engines.barlow_twins"):
        BarlowTwinsIteration(batch_size=64, projector_dim=32)
    assert caplog.text == ""
