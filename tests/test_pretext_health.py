"""Pretext health: the measures against their trivial solutions, and the benchmark's labelling of verdicts."""

import pytest
import torch
from monai.networks.nets import UNet

from medssl.apps.pretext_report import NOT_LEARNED, health_markdown, label_verdicts
from medssl.engines import barlow_health, restoration_health, untrained_copy
from medssl.networks import GatedRestoration
from medssl.transforms import RandContextSwap


def _unet(dims=2, channels=2, out=None):
    return UNet(dims, channels, out or 2 * channels, (4, 8), (2,), num_res_units=0)


def _batches(dims=2, n=4):
    g = torch.Generator().manual_seed(0)
    swap = RandContextSwap(patch_size=4, num_swaps=3)
    swap.set_random_state(0)
    out = []
    for _ in range(n):
        y = torch.randn((2,) + (16,) * dims, generator=g)
        out.append({"image": swap(y)[None], "label": y[None]})
    return out


def test_gated_restoration_starts_near_the_identity_in_2d_and_3d_and_can_replace_content():
    for dims in (2, 3):
        net = GatedRestoration(_unet(dims))
        x = torch.randn((1, 2) + (16,) * dims)
        assert torch.allclose(net(x), x * (1 - torch.sigmoid(torch.tensor(-5.0))), atol=1e-6)
    head = net.backbone.model[-1].conv  # an open gate (bias +20) with content 3: the output is 3 everywhere
    with torch.no_grad():
        head.bias.copy_(torch.tensor([3.0, 3.0, 20.0, 20.0]))
    assert torch.allclose(net(x), torch.full_like(x, 3.0), atol=1e-5)
    with pytest.raises(ValueError, match="twice the input"):
        GatedRestoration(_unet(2, out=2))(torch.randn(1, 2, 16, 16))


def test_restoration_health_of_the_identity_is_its_trivial_solution_and_of_the_oracle_zero():
    batches = _batches()
    identity = restoration_health(GatedRestoration(_unet(), gate_bias=-100.0), batches)
    assert identity["value"] == identity["trivial"] > 0 and identity["ratio"] == 1 and not identity["learned"]
    assert identity["corrupted_value"] == identity["corrupted_trivial"] > identity["trivial"]

    class Oracle(torch.nn.Module):  # knows the original: restores every crop exactly
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.lookup = {b["image"].sum().item(): b["label"] for b in batches}

        def forward(self, x):
            return self.lookup[x.sum().item()]

    oracle = restoration_health(Oracle(), batches)
    assert oracle["value"] == 0 and oracle["learned"] and oracle["trivial"] == identity["trivial"]


def test_untrained_copy_is_reproducible_and_resets_trained_weights():
    net = _unet()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    a, b = untrained_copy(net, seed=3), untrained_copy(net, seed=3)
    for (_, pa), (_, pb), (_, pn) in zip(a.named_parameters(), b.named_parameters(), net.named_parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pn)


def test_barlow_health_compares_with_the_same_network_untrained():
    from medssl.engines import BarlowTwinsNet
    from medssl.networks import DFRUNet

    torch.manual_seed(0)
    backbone = DFRUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32))
    net = BarlowTwinsNet(backbone, 32, (16, 8)).eval()
    x = torch.randn(24, 1, 32, 32)
    batches = [{"view1": x[i:i + 8], "view2": x[i:i + 8] + 0.01 * torch.randn(8, 1, 32, 32)} for i in (0, 8, 16)]
    h = barlow_health(net, batches)
    assert h["samples"] == 24 and h["trivial_rule"] == "untrained network"
    # the network is untrained itself (seed 0 in both): its loss is the trivial one, so not learned
    again = barlow_health(untrained_copy(net, 0).eval(), batches)
    assert abs(again["value"] - again["trivial"]) < 1e-6 and not again["learned"]


def test_verdicts_resting_on_an_unlearned_pretext_are_labelled_so():
    results = {
        "pretext_health": {
            "block_mix": {"0": {"metric": "accuracy", "value": 0.05, "trivial": 0.01, "trivial_rule": "chance",
                                "probe": 0.4, "learned": False},
                          "1": {"metric": "accuracy", "value": 0.8, "trivial": 0.01, "trivial_rule": "chance",
                                "probe": 0.02, "learned": True}},
            "context_restoration": {"0": {"metric": "restoration_mse", "value": 0.05, "trivial": 0.12,
                                          "trivial_rule": "identity", "learned": True}},
        },
        "comparisons": [
            {"variant": "method", "baseline": "baseline", "verdict": "better"},
            {"variant": "context_restoration", "baseline": "baseline", "verdict": "no detectable difference"},
            {"variant": "method", "baseline": "context_restoration", "verdict": "worse"},
            {"variant": "no_cfb", "baseline": "baseline", "verdict": "worse"},
        ],
    }
    label_verdicts(results, {"method": "block_mix", "context_restoration": "context_restoration", "baseline": None,
                             "no_cfb": None})
    verdicts = [c["verdict"] for c in results["comparisons"]]
    assert verdicts == [NOT_LEARNED, "no detectable difference", NOT_LEARNED, "worse"]
    assert results["comparisons"][0]["statistical_verdict"] == "better"
    assert results["comparisons"][0]["pretext_not_learned"] == ["block_mix"]
    table = "\n".join(health_markdown(results))
    assert "| block_mix | 0 | accuracy |" in table and "| no |" in table and "0.400" in table
