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
    bottom = net.model[1].submodule[1].submodule[1].submodule  # down, down, down, bottom (+ CFB)
    assert isinstance(bottom[1], ContextualFusionBlock)
    handle = bottom.register_forward_hook(lambda m, i, o: seen.setdefault("b", o))
    y = net(x)
    handle.remove()
    feats = net.encode(x)
    assert feats.shape == (2, 64, *([4] * dims)) and torch.equal(feats, seen["b"])
    assert y.shape == (2, 3, *([32] * dims))
    scripted = torch.jit.script(net)  # exportable like the other bundles' networks
    assert torch.allclose(scripted(x), y, atol=1e-5)


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
