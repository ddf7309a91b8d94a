"""The block-mix pretext health (medssl.engines.block_mix_health): network accuracy vs chance vs a per-block
intensity-histogram probe. The probe reads the combination off plain block copies of modalities with different
intensity distributions, and is at chance once normalize_blocks="histogram" equalises every block."""

import numpy as np
import pytest
import torch
from torch import nn

from monai.data import list_data_collate

from medssl.engines import block_mix_health
from medssl.engines.block_mix_probe import block_intensity_features, combination_scores
from medssl.networks import BlockMixHead
from medssl.transforms import RandModalityBlockMix
from medssl.transforms.block_mix import _to_blocks

GRID = (2, 2, 1)


def _image(seed):
    """(4, 16, 16, 16): a shared foreground ball; each 'modality' a different intensity distribution of the same
    anatomy (a ramp) plus noise; background 0."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij"))
    fg = (g ** 2).sum(0) < 7.5 ** 2
    ramp = g[0] / 8
    x = np.stack([ramp + rng.normal(0, .2, fg.shape) - 1, np.exp(ramp + rng.normal(0, .3, fg.shape)),
                  1.5 * np.tanh(-3 * ramp) + rng.normal(0, .3, fg.shape), rng.standard_t(3, fg.shape) + 2])
    return (x * fg).astype(np.float32)


def _batches(mode, n, seed, k=20):
    t = RandModalityBlockMix(4, GRID, k, normalize_blocks=mode).set_random_state(seed)
    items = []
    for i in range(n):
        items.append({"image": torch.as_tensor(t(_image(seed * 1000 + i))), "label": torch.tensor(t.label)})
    return [list_data_collate(items[i:i + 2]) for i in range(0, n, 2)], t.combinations


class _Constant(nn.Module):
    """Always the same logits: accuracy = how often the label is class 0."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(len(x), self.k) + self.w


class _Oracle(_Constant):
    """Knows the label of every image it was shown (stands for a network that learned the pretext)."""

    def __init__(self, k, batches):
        super().__init__(k)
        self.known = {x.numpy().tobytes(): int(y) for b in batches for x, y in zip(b["image"], b["label"])}

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.tensor([self.known[i.numpy().tobytes()] for i in x]), self.k).float()


def test_features_are_the_foreground_histogram_quantiles_mean_and_std():
    x = torch.as_tensor(np.stack([_image(0), _image(1)]))
    f = block_intensity_features(x, GRID)
    assert f.shape == (2, 4, 4, 32 + 10 + 2)
    xb = _to_blocks(x[1], GRID)[3]  # crop 1, block 3: (4, v)
    fg = (xb != 0).any(0)
    for c in range(4):
        v = xb[c][fg].numpy()
        assert f[1, 3, c, :32].sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(f[1, 3, c, 32:42], np.quantile(v, (np.arange(10) + 0.5) / 10), atol=0.04)
        assert float(f[1, 3, c, 42]) == pytest.approx(v.mean(), abs=1e-4)
        assert float(f[1, 3, c, 43]) == pytest.approx(v.std(), abs=1e-4)


def test_combination_scores_sum_the_layouts_log_probabilities():
    table = RandModalityBlockMix(4, GRID, 6).combinations
    logp = torch.log_softmax(torch.randn(3, 4, 4, 4), -1)
    s = combination_scores(logp, table)
    ref = torch.tensor([[sum(float(logp[n, b, c, table[k, c, b]]) for b in range(4) for c in range(4))
                         for k in range(6)] for n in range(3)])
    torch.testing.assert_close(s, ref)
    # a perfect per-block prediction names its combination
    onehot = torch.nn.functional.one_hot(torch.as_tensor(np.array(table[4])).T, 4).float()[None]
    assert int(combination_scores(torch.log(onehot.clamp_min(1e-6)), table).argmax()) == 4


def test_the_probe_reads_plain_copies_and_is_at_chance_after_histogram_normalisation():
    test, table = _batches(None, 24, seed=0)
    fit, _ = _batches(None, 48, seed=1)
    r = block_mix_health(_Constant(20), test, fit, table, GRID)
    assert {"metric", "value", "trivial", "trivial_rule", "learned", "probe", "probe_rule"} <= set(r)
    assert r["metric"] == "block_mix_accuracy" and r["trivial"] == 0.05 and r["trivial_rule"] == "chance"
    assert r["probe"] >= 0.9 and r["probe_block_accuracy"] > 0.8, r  # the intensity shortcut
    assert not r["learned"]
    test, table = _batches("histogram", 24, seed=0)
    fit, _ = _batches("histogram", 48, seed=1)
    r = block_mix_health(_Constant(20), test, fit, table, GRID)
    assert r["probe_block_accuracy"] == 0.25, r  # the same prediction for every channel of a block: 1 of 4
    assert r["probe"] <= 0.25 and not r["learned"]
    # a network that knows the answer is learned; without fit crops the probe is not measured
    r = block_mix_health(_Oracle(20, test), test, fit, table, GRID)
    assert r["value"] == 1.0 and r["learned"]
    r = block_mix_health(_Oracle(20, test), test, [], table, GRID)
    assert r["probe"] is None and r["learned"]


def test_grid_and_combinations_default_to_the_block_mix_heads():
    test, table = _batches("histogram", 8, seed=0)

    class Features(nn.Module):
        def encode(self, x):
            return x

    net = BlockMixHead(Features(), 4, GRID, table, hidden=8)
    a = block_mix_health(net, test, test)
    b = block_mix_health(net, test, test, table, GRID)
    assert a == b and 0 <= a["value"] <= 1
    with pytest.raises(ValueError, match="block grid"):
        block_mix_health(net, test, test, table, (2, 1, 1))
