"""Contextual fusion block and CFBUNet of SLeM (issue 4)."""

import pytest
import torch
from monai.networks.nets import UNet

from medssl.networks import CFBUNet, ContextualFusionBlock, EncoderHead, load_pretrained

KW = dict(in_channels=4, out_channels=3, channels=(8, 16, 32, 64), strides=(2, 2, 2))


@pytest.mark.parametrize("dims", [2, 3])
def test_cfb_preserves_shape_and_sees_global_context(dims):
    torch.manual_seed(0)
    cfb = ContextualFusionBlock(dims, 16).eval()
    x = torch.randn(2, 16, *([8] * dims))
    y = cfb(x)
    assert y.shape == x.shape
    # the global branch: changing one corner changes the output at the opposite corner even though the
    # 3x3 branches with dilations (1, 2, 3) cannot reach it (reach 3 < 7 positions away); without
    # normalisation, which would itself couple all positions
    cfb = ContextualFusionBlock(dims, 16, norm=None).eval()
    y = cfb(x)
    x2 = x.clone()
    x2[(slice(None), slice(None)) + (0,) * dims] += 5.0
    far = (slice(None), slice(None)) + (-1,) * dims
    assert not torch.allclose(cfb(x2)[far], y[far])
    for branch in cfb.branches:  # ... which the dilated branches alone do not see
        assert torch.allclose(branch(x2)[far], branch(x)[far])


@pytest.mark.parametrize("dims", [2, 3])
def test_cfb_unet_without_fusion_is_monai_unet(dims):
    plain, ours = UNet(dims, **KW), CFBUNet(dims, context_fusion=False, **KW)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, *([32] * dims))
    assert torch.allclose(ours.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("dims", [2, 3])
def test_cfb_unet_encode_is_the_bottleneck_of_forward(dims):
    net = CFBUNet(dims, **KW).eval()
    x = torch.randn(2, 4, *([32] * dims))
    seen = {}
    bottom = net.model[1].submodule[1].submodule[1].submodule  # down, down, down, bottom
    assert isinstance(net.model[1].submodule[0][1], ContextualFusionBlock)  # the CFB follows level 1's down layer
    handle = bottom.register_forward_hook(lambda m, i, o: seen.setdefault("b", o))
    y = net(x)
    handle.remove()
    feats = net.encode(x)
    assert feats.shape == (2, 64, *([4] * dims)) and torch.equal(feats, seen["b"])
    assert y.shape == (2, 3, *([32] * dims))
    scripted = torch.jit.script(net)  # exportable like the other bundles' networks
    assert torch.allclose(scripted(x), y, atol=1e-5)


def _cfb_input_shape(net, x):
    """The shape of the feature map the network's (only) CFB receives in a forward pass of ``x``."""
    (cfb,) = [m for m in net.modules() if isinstance(m, ContextualFusionBlock)]
    seen = {}
    handle = cfb.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(i[0].shape)))
    net.eval()(x)
    handle.remove()
    return seen["shape"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_the_cfb_refines_the_features_of_its_level(dims, level):
    """``fusion_level`` i: the CFB sees channels[i] at the size ``fusion_size`` says, on the encoder path
    (so ``encode`` and the pretext train it); the bottom level is the old placement."""
    net = CFBUNet(dims, fusion_level=level, **KW)
    size = (32, 24, 16)[:dims]
    shape = _cfb_input_shape(net, torch.randn(1, 4, *size))
    assert shape[1] == KW["channels"][level] and shape[2:] == net.fusion_size(size)
    scale = 2 ** min(level + 1, 3)
    assert net.fusion_size(size) == tuple(s // scale for s in size)
    assert any(isinstance(m, ContextualFusionBlock) for m in net.modules())
    with pytest.raises(ValueError, match="fusion_level must be in range"):
        CFBUNet(dims, fusion_level=4, **KW)


def test_the_configured_cfb_sees_a_feature_map_its_dilated_kernels_fit():
    """At slem's configured crop, the CFB's widest kernel (2 * max dilation + 1 positions) fits inside the
    feature map it refines; at the old placement (the 4^3 bottleneck) it did not (a 3x3 kernel of
    dilation 3 spans 7 positions, so on 4^3 it mostly saw zero padding)."""
    from monai.bundle import ConfigParser

    from medssl.bundles import bundles_dir

    parser = ConfigParser()
    parser.read_config(str(bundles_dir() / "slem" / "configs" / "train.json"))
    parser.update({"device": "$torch.device('cpu')"})
    roi, dilations = parser.get_parsed_content("roi_size"), parser.get_parsed_content("fusion_dilations")
    net = parser.get_parsed_content("network_def")
    shape = _cfb_input_shape(net, torch.zeros(1, 4, *roi))
    assert min(shape[2:]) >= 2 * max(dilations) + 1, shape
    inference = ConfigParser()
    inference.read_config(str(bundles_dir() / "slem" / "configs" / "inference.json"))
    assert inference.get_parsed_content("network_def").fusion_level == net.fusion_level
    old = CFBUNet(3, 4, 3, net.channels, net.strides, fusion_level=len(net.channels) - 1, fusion_dilations=dilations)
    assert min(old.fusion_size(roi)) < 2 * max(dilations) + 1


def test_encoder_head_classifier_transfers_backbone_weights(tmp_path):
    backbone = CFBUNet(3, **KW)
    clf = EncoderHead(backbone, 64, (32, 10))
    logits = clf(torch.randn(2, 4, 32, 32, 32))
    assert logits.shape == (2, 10)
    torch.save(backbone.state_dict(), tmp_path / "pretrained.pt")
    fresh = CFBUNet(3, **{**KW, "out_channels": 2})  # only the output head differs
    load_pretrained(fresh, tmp_path / "pretrained.pt")
    enc = {k: v for k, v in backbone.state_dict().items() if k in fresh.state_dict()
           and v.shape == fresh.state_dict()[k].shape}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in enc.items())
