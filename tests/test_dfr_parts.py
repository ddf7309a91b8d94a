"""Building blocks of the dfr_barlow method (issue 3): the attention U-Net and the lesion-aware loss."""

import numpy as np
import pytest
import torch

from medssl.losses.lesion_contrastive import LesionAwareContrastiveLoss
from medssl.networks.blocks import DilatedContextBlock, SpatialGate
from medssl.networks.dfr_unet import DFRUNet

from conftest import REPO

ALL_OFF = dict(channel_attention=False, spatial_attention=False, dilation=False, compression=False)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("switches", [{}, ALL_OFF, {"spatial_attention": False}, {"dilation": False}])
def test_dfr_unet_shapes_in_2d_and_3d(spatial_dims, switches):
    net = DFRUNet(spatial_dims, 3, 2, channels=(8, 16, 32), dropout=0.1, **switches)
    x = torch.randn(2, 3, *([16] * spatial_dims))
    logits, emb = net.forward_features(x)
    assert logits.shape == (2, 2, *x.shape[2:]) and emb.shape == (2, 8, *x.shape[2:])
    assert net.encode(x).shape == (2, 32, *([4] * spatial_dims))
    assert torch.equal(net.eval()(x), net.forward_features(x)[0])


def test_each_switch_changes_the_architecture():
    n_params = {k: sum(p.numel() for p in DFRUNet(2, 1, 2, (8, 16, 32), **{**ALL_OFF, k: True}).parameters())
                for k in ALL_OFF}
    plain = sum(p.numel() for p in DFRUNet(2, 1, 2, (8, 16, 32), **ALL_OFF).parameters())
    assert n_params["channel_attention"] > plain and n_params["spatial_attention"] > plain
    assert n_params["dilation"] > plain and n_params["compression"] != plain


def test_spatial_gate_reweights_positions_only():
    gate = SpatialGate(2)
    x = torch.rand(1, 4, 8, 8)
    g = gate.gate(x)
    assert g.shape == (1, 1, 8, 8) and bool(((g > 0) & (g < 1)).all())
    torch.testing.assert_close(gate(x), x * g)


def test_dilated_block_sees_farther_than_a_3x3_conv():
    block = DilatedContextBlock(2, 1, 4, dilations=(1, 2, 4), norm=None).eval()
    x = torch.zeros(1, 1, 21, 21, requires_grad=True)
    block(x)[0, :, 10, 10].sum().backward()
    reach = np.argwhere(x.grad[0, 0].abs().numpy() > 0)
    assert (reach.max(0) - reach.min(0)).max() == 8  # dilation 4: +-4 pixels


def test_lesion_loss_is_lower_for_aligned_embeddings():
    y = torch.zeros(2, 1, 32, 32)
    y[0, 0, 4:7, 4:7] = 1
    y[0, 0, 12:30, 12:30] = 1
    y[1, 0, 20:24, 2:6] = 1
    loss = LesionAwareContrastiveLoss(num_samples=128)
    aligned = torch.cat([y * 2 - 1, torch.zeros(2, 7, 32, 32)], 1)
    torch.manual_seed(0)
    assert loss(aligned, y) < loss(torch.randn(2, 8, 32, 32), y) - 1.0
    emb = torch.randn(2, 8, 32, 32, requires_grad=True)
    loss(emb, y).backward()
    assert emb.grad.abs().sum() > 0


def test_small_lesions_are_sampled_as_often_as_large_ones():
    lesion = torch.zeros(1, 64, 64, dtype=torch.bool)
    lesion[0, 2:4, 2:4] = True  # 4 pixels
    lesion[0, 20:60, 20:60] = True  # 1600 pixels
    torch.manual_seed(0)
    idx, lab = LesionAwareContrastiveLoss(num_samples=4000).sample(lesion)[0]
    picked = idx[lab == 1]
    small = lesion[0].reshape(-1).clone()
    small[:] = False
    small.view(64, 64)[2:4, 2:4] = True
    share = small[picked].float().mean().item()
    assert 0.4 < share < 0.6
    bg = idx[lab == 0]
    assert not lesion[0].reshape(-1)[bg].any()


def test_batch_without_lesion_gives_zero_and_shape_errors():
    loss = LesionAwareContrastiveLoss()
    emb = torch.randn(2, 4, 16, 16, requires_grad=True)
    assert loss(emb, torch.zeros(2, 1, 16, 16)).item() == 0.0
    with pytest.raises(ValueError, match="one channel"):
        loss(emb, torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="does not match"):
        loss(emb, torch.zeros(2, 1, 8, 8))


def test_dataset_layout_picks_the_bundles_data_variant():
    from medssl.data import LAYOUTS, dataset_layout

    assert dataset_layout("brats18_2mm") == "brats" and dataset_layout("brats") == "brats"
    assert dataset_layout("dsb2018_nuclei") == "nuclei" and dataset_layout("my_cells") == "nuclei"
    assert {dataset_layout(n) for n in ("brats18_2mm", "dsb2018_nuclei")} == set(LAYOUTS)


@pytest.mark.parametrize("name, channels, roi, volumes", [("dsb2018_nuclei", 1, [128, 128], 8),
                                                          ("brats18_2mm", 4, [96, 96], 1)])
def test_bundle_config_switches_on_the_layout(name, channels, roi, volumes):
    """train.json's layout switch: 4 BraTS modalities vs 1 grey channel, the patch size, and 8 slices
    per BraTS volume (a batch of 8 slices is 1 volume per loader batch); inference.json agrees."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / "dfr_barlow" / "configs"
    for files in ([configs / "train.json"], [configs / "inference.json"]):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser["dataset_name"] = name
        assert parser.get_parsed_content("in_channels") == channels
        assert parser.get_parsed_content("roi_size") == roi
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser["dataset_name"] = name
    assert parser.get_parsed_content("loader_batch_size") == volumes
    parser["layout"] = "cells"
    with pytest.raises(RuntimeError) as e:  # the config parser wraps choose()'s error
        parser.get_parsed_content("in_channels", lazy=False)
    assert "layout must be one of ['brats', 'nuclei'], got 'cells'" in str(e.value.__cause__)


def test_benchmark_pairs_each_differ_in_exactly_one_factor():
    """Every compared pair of the dfr_barlow benchmark (each variant against baseline, and the spec's
    ``pairs``) differs in one factor only: the pretraining, the lesion-aware loss, the attention blocks, or
    the DFR architecture as a whole; and each variant starts from a pretraining of its own network."""
    from medssl.apps.benchmark import load_spec

    spec = load_spec("dfr_barlow")
    switches = ("channel_attention", "spatial_attention", "dilation", "compression")
    factors = [{"pretrained"}, {"lac_weight"}, {"channel_attention", "spatial_attention"}, set(switches)]

    def setting(name):
        v = spec.variants[name]
        s = {"lac_weight": 0.1, **{k: True for k in switches}, **{k: x for k, x in v.train.items() if k != "init"}}
        assert (v.train.get("init") == "method") == (v.pretrain is not None), name
        if v.pretrain is not None:
            pre = {k: True for k in switches} | spec.pretrainings[v.pretrain]
            assert all(pre[k] == s[k] for k in switches), f"{name}: pretrained on another network"
        return {**s, "pretrained": v.pretrain is not None}

    pairs = [("method", "baseline")] + [(p["variant"], p["against"]) for p in spec.pairs.values()]
    assert {n for pair in pairs for n in pair} == set(spec.names), "every variant is in a compared pair"
    for a, b in pairs:
        sa, sb = setting(a), setting(b)
        differ = {k for k in sa if sa[k] != sb[k]}
        assert differ in factors, f"{a} vs {b} differ in {sorted(differ)}"
