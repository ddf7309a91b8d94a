"""The position-aware SLeM pretext classifier (BlockMixHead): each block's prediction comes from the
features at that block, and it learns the block-mix classification on real BraTS crops."""

import math

import pytest
import torch
from torch import nn

from monai.transforms import LoadImage, NormalizeIntensity

from medssl.engines import classification_accuracy
from medssl.networks import BlockMixHead, CFBUNet
from medssl.transforms import RandModalityBlockMix
from medssl.transforms.block_mix import combination_table

MODALITIES = ("flair", "t1", "t1ce", "t2")


class _Features(nn.Module):
    """A stand-in backbone whose ``encode`` returns its input: the test sets the features directly."""

    def encode(self, x):
        return x


@pytest.mark.parametrize("grid,size", [((2, 2, 1), (4, 4, 4)), ((2, 2), (6, 4))])
def test_a_blocks_prediction_depends_only_on_the_features_at_that_block(grid, size):
    torch.manual_seed(0)
    b = math.prod(grid)
    head = BlockMixHead(_Features(), 16, grid, combination_table(4, b, 20, seed=0), hidden=8).eval()
    f = torch.randn(2, 16, *size)
    ref = head.block_logits(f)
    assert ref.shape == (2, b, 4, 4)
    cell = [s // g for s, g in zip(size, grid)]
    for block, pos in enumerate(torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(b, -1).tolist()):
        g = f.clone()  # change the features inside this block's region only
        g[(slice(None), slice(None)) + tuple(slice(p * c, (p + 1) * c) for p, c in zip(pos, cell))] += 3.0
        out = head.block_logits(g)
        changed = [(out[:, i] - ref[:, i]).abs().max().item() > 1e-6 for i in range(b)]
        assert changed == [i == block for i in range(b)], (block, changed)
    # the combination logits are the per-block log-probabilities of each combination's modality layout
    table = torch.as_tensor(combination_table(4, b, 20, seed=0))
    logp = torch.log_softmax(ref, -1)
    k = 7
    expect = sum(logp[:, i, c, table[k, c, i]] for i in range(b) for c in range(4))
    assert torch.allclose(head(f)[:, k], expect, atol=1e-5)


def test_the_head_refuses_a_table_of_another_grid():
    with pytest.raises(ValueError, match="cover 2 blocks but the grid"):
        BlockMixHead(_Features(), 16, (2, 2, 1), combination_table(4, 2, 10))


def test_block_mix_classification_is_learned_on_a_fixed_batch_of_real_crops(brats_dir):
    """A short overfit: one real 4-modality 32^3 crop mixed by each of 8 combinations; accuracy rises from
    chance (1/8) to (nearly) all correct within 60 steps."""
    torch.manual_seed(0)
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    img = LoadImage(image_only=True, ensure_channel_first=True)([str(case / f"{case.name}_{m}.nii.gz")
                                                                 for m in MODALITIES])
    img = NormalizeIntensity(nonzero=True, channel_wise=True)(img).as_tensor().float()
    c = [s // 2 for s in img.shape[1:]]
    crop = img[:, c[0] - 16:c[0] + 16, c[1] - 16:c[1] + 16, c[2] - 16:c[2] + 16]
    mixer = RandModalityBlockMix(4, (2, 2, 1), 8, seed=0, spatial_size=(32, 32, 32))
    x = torch.stack([mixer.mix(crop, k) for k in range(8)])
    y = torch.arange(8)
    backbone = CFBUNet(3, 4, 3, (8, 16, 32), (2, 2), num_res_units=0, fusion_level=1)
    head = BlockMixHead(backbone, 32, (2, 2, 1), mixer.combinations, hidden=32)
    opt = torch.optim.Adam(head.parameters(), 3e-3)
    acc = []
    for _ in range(60):
        logits = head(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append(classification_accuracy({"pred": logits, "label": y}))
    assert acc[0] <= 0.5 and max(acc[-5:]) >= 0.875, acc
