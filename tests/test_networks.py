import pytest
import torch

from monai.networks.nets import UNet

from medssl.networks import CheckpointMismatchError, initialise, load_pretrained


def unet(out_channels=3, spatial_dims=3, in_channels=4):
    return UNet(spatial_dims, in_channels, out_channels, (8, 16, 32), (2, 2), num_res_units=0)


def test_pretrained_weights_transfer_except_the_head(tmp_path):
    pre = unet(out_channels=4)
    torch.save(pre.state_dict(), tmp_path / "pretrained.pt")
    net = initialise(unet(out_channels=3), "method", tmp_path / "pretrained.pt")
    own, src = net.state_dict(), pre.state_dict()
    same = [k for k in own if own[k].shape == src[k].shape]
    assert len(same) == len(own) - 2  # all but the head's weight and bias
    assert all(torch.equal(own[k], src[k]) for k in same)
    fresh = initialise(unet(out_channels=3), "baseline")
    assert not torch.equal(fresh.state_dict()[same[0]], src[same[0]])


def test_wrapped_checkpoint_formats_load(tmp_path):
    pre = unet()
    torch.save({"network": pre.state_dict(), "optimizer": {}}, tmp_path / "ck.pt")
    net = load_pretrained(unet(), tmp_path / "ck.pt", allow_head_mismatch=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), pre.state_dict().values()))


@pytest.mark.parametrize("other", [lambda: unet(spatial_dims=2), lambda: unet(in_channels=1),
                                   lambda: torch.nn.Sequential(torch.nn.Conv3d(4, 3, 3))])
def test_checkpoint_of_another_network_is_refused(tmp_path, other):
    path = tmp_path / "other.pt"
    torch.save(other().state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="checkpoint of another network") as e:
        initialise(unet(), "method", path)
    assert str(path) in str(e.value)


def test_missing_checkpoint_and_bad_init(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="missing; expected a pretrained checkpoint"):
        initialise(unet(), "method", tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="'method' or 'baseline'"):
        initialise(unet(), "pretrained")
