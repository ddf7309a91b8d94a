"""Barlow Twins pieces of the dfr_barlow method (issue 3): two views, projector net, trainer iteration."""

import pytest
import torch

from monai.engines import SupervisedTrainer
from monai.losses import BarlowTwinsLoss
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandSpatialCropd

from medssl.engines.barlow_twins import BarlowTwinsIteration, BarlowTwinsNet
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
