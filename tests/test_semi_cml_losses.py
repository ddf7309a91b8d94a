"""Semi-CML losses (issue 5) on predictions built from the real BraTS whole-tumour masks."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.losses import AreaSimilarityContrastiveLoss, MutualLearningLoss

CROP = (64, 64, 48)
N_CASES = 8


@pytest.fixture(scope="module")
def masks(brats_dir) -> torch.Tensor:
    """``(8, 1, 64, 64, 48)`` whole-tumour masks (seg > 0) of the first 8 real cases, center-cropped."""
    out = []
    for case in sorted(p for p in brats_dir.iterdir() if p.is_dir())[:N_CASES]:
        seg = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj) > 0
        start = [(s - c) // 2 for s, c in zip(seg.shape, CROP)]
        crop = seg[tuple(slice(a, a + c) for a, c in zip(start, CROP))]
        assert crop.sum() > 1000, case.name
        out.append(crop)
    return torch.from_numpy(np.stack(out)[:, None]).float()


def logits_of(mask: torch.Tensor, noise: float = 1.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((2 * mask - 1) * 4 + noise * torch.randn(mask.shape, generator=g)).to(dtype)


def grown(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """The mask dilated by ``radius`` voxels: the other modality's slightly different view of the tumour."""
    pool = F.max_pool2d if mask.ndim == 4 else F.max_pool3d
    return pool(mask, 2 * radius + 1, stride=1, padding=radius)


def pair(masks: torch.Tensor, dtype=torch.float32):
    """Logits of network A (the masks) and B (dilated masks, other noise), case by case aligned."""
    return logits_of(masks, seed=0, dtype=dtype), logits_of(grown(masks), seed=1, dtype=dtype)


# ---- area-similarity contrastive loss ---------------------------------------------------------------------------


def test_asc_aligned_pairs_lower_than_shuffled_pairs(masks):
    la, lb = pair(masks)
    loss = AreaSimilarityContrastiveLoss()
    aligned = loss(la, lb)
    shuffled = loss(la, lb.roll(1, dims=0))  # every case paired with another case's prediction
    assert aligned < 0.2 * math.log(N_CASES) < math.log(N_CASES) < shuffled
    perm = torch.tensor([3, 0, 5, 1, 7, 2, 4, 6])
    assert (perm != torch.arange(N_CASES)).all()
    assert aligned < loss(la, lb[perm])


def test_asc_identical_inputs_near_minimum(masks):
    la, lb = pair(masks)
    loss = AreaSimilarityContrastiveLoss()
    s = loss.similarity(la, la)
    # every positive is at the largest possible similarity 1/t; the loss is then far below chance (log N)
    assert torch.allclose(s.diagonal(), torch.full((N_CASES,), 10.0), atol=1e-4)
    assert (s <= 10.0 + 1e-4).all() and (s >= 0).all()
    same = loss(la, la)
    assert 0 <= same < loss(la, lb) and same < 0.15 * math.log(N_CASES)
    # closed form for identical inputs: L_i = log(1 + sum_{j != i} exp(s_ij - s_ii))
    off = s - s.diagonal()[:, None]
    expected = torch.log1p(off.masked_fill(torch.eye(N_CASES, dtype=torch.bool), float("-inf")).exp().sum(1))
    assert torch.allclose(AreaSimilarityContrastiveLoss(reduction="none")(la, la), expected, atol=1e-5)


def test_asc_invariant_to_joint_permutation(masks):
    la, lb = pair(masks)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    loss = AreaSimilarityContrastiveLoss()
    assert torch.allclose(loss(la, lb), loss(la[perm], lb[perm]), atol=1e-6)
    per_case = AreaSimilarityContrastiveLoss(reduction="none")
    assert torch.allclose(per_case(la, lb)[perm], per_case(la[perm], lb[perm]), atol=1e-5)


def test_asc_on_2d_slices(masks):
    # per case the axial slice with the largest tumour section
    idx = masks.sum(dim=(1, 2, 3)).argmax(dim=1)
    sl = torch.stack([masks[i, :, :, :, k] for i, k in enumerate(idx)])
    assert sl.shape == (N_CASES, 1, 64, 64)
    la, lb = pair(sl)
    loss = AreaSimilarityContrastiveLoss(grid=4)
    aligned, shuffled = loss(la, lb), loss(la, lb.roll(1, dims=0))
    assert torch.isfinite(aligned) and aligned < 0.5 * math.log(N_CASES) < shuffled
    assert loss.area_vectors(la).shape == (N_CASES, 16)
    assert AreaSimilarityContrastiveLoss(grid=4).area_vectors(pair(masks)[0]).shape == (N_CASES, 64)


def test_asc_area_vectors_are_cell_fractions(masks):
    m = masks[:2]
    hard = (2 * m - 1) * 50.0  # saturated logits: probabilities are the mask itself
    areas = AreaSimilarityContrastiveLoss(grid=2).area_vectors(hard)
    cells = m.reshape(2, 1, 2, 32, 2, 32, 2, 24).mean(dim=(3, 5, 7)).reshape(2, -1)
    assert torch.allclose(areas, cells, atol=1e-6)


def test_asc_single_case_gives_zero(masks):
    la, lb = pair(masks[:1])
    la.requires_grad_(True)
    lb.requires_grad_(True)
    loss = AreaSimilarityContrastiveLoss()(la, lb)
    assert loss.shape == () and loss.item() == 0.0 and loss.dtype == la.dtype
    loss.backward()
    assert la.grad is not None and lb.grad is not None and (la.grad == 0).all()
    none = AreaSimilarityContrastiveLoss(reduction="none")(la, lb)
    assert none.shape == (1,) and none.item() == 0.0


def test_asc_reductions(masks):
    la, lb = pair(masks)
    mean = AreaSimilarityContrastiveLoss()(la, lb)
    none = AreaSimilarityContrastiveLoss(reduction="none")(la, lb)
    total = AreaSimilarityContrastiveLoss(reduction="sum")(la, lb)
    assert none.shape == (N_CASES,) and (none >= 0).all()
    assert torch.allclose(total, N_CASES * mean, rtol=1e-5)
    assert torch.allclose(none.mean(), mean)


def test_asc_gradients_reach_both_inputs(masks):
    la, lb = pair(masks[:4])
    la = (la * 0.5).requires_grad_(True)  # softer logits: sigmoid not saturated
    lb = (lb * 0.5).requires_grad_(True)
    AreaSimilarityContrastiveLoss()(la, lb.roll(1, dims=0)).backward()
    for g in (la.grad, lb.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_asc_all_background_prediction_is_finite(masks):
    la, lb = pair(masks[:4])
    lb = lb.clone()
    lb[2] = -30.0  # network B sees no tumour at all in case 2
    la.requires_grad_(True)
    lb.requires_grad_(True)
    loss = AreaSimilarityContrastiveLoss(reduction="none")(la, lb)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()


def test_asc_softmax_mode(masks):
    la, lb = pair(masks[:4])
    # two-channel logits [0, l]: softmax foreground = sigmoid(l)
    two_a = torch.cat([torch.zeros_like(la), la], dim=1)
    two_b = torch.cat([torch.zeros_like(lb), lb], dim=1)
    sig = AreaSimilarityContrastiveLoss()(la, lb)
    soft = AreaSimilarityContrastiveLoss(sigmoid=False, include_background=False)(two_a, two_b)
    assert torch.allclose(sig, soft, atol=1e-5)
    with_bg = AreaSimilarityContrastiveLoss(sigmoid=False)
    assert with_bg.area_vectors(two_a).shape == (4, 128)
    assert torch.isfinite(with_bg(two_a, two_b))


def test_asc_rejects_bad_inputs(masks):
    la, lb = pair(masks[:2])
    loss = AreaSimilarityContrastiveLoss()
    with pytest.raises(ValueError):
        loss(la, lb[:, :, :32])
    with pytest.raises(ValueError):
        loss(la[:, :, 0, 0], lb[:, :, 0, 0])
    with pytest.raises(ValueError):
        AreaSimilarityContrastiveLoss(temperature=0)


# ---- mutual-learning loss ---------------------------------------------------------------------------------------


def test_mutual_zero_for_identical_predictions(masks):
    la, _ = pair(masks)
    assert MutualLearningLoss()(la, la.clone()).item() == 0.0


def test_mutual_grows_with_disagreement(masks):
    masks = masks[:4]
    la = logits_of(masks, seed=0)
    loss = MutualLearningLoss()
    values = [loss(la, logits_of(grown(masks, r), seed=0)).item() for r in (1, 2, 3)]
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] < loss(la, logits_of(masks.roll(1, dims=0), seed=0)).item()  # other cases' tumours
    # value: 2 * mse(p_a, p_b)
    lb = logits_of(grown(masks), seed=1)
    assert torch.allclose(loss(la, lb), 2 * F.mse_loss(torch.sigmoid(la), torch.sigmoid(lb)), rtol=1e-5)


def test_mutual_gradient_stops_at_detached_side(masks):
    la0, lb0 = pair(masks[:3], dtype=torch.float64)
    la0, lb0 = la0 * 0.5, lb0 * 0.5
    la, lb = la0.clone().requires_grad_(True), lb0.clone().requires_grad_(True)
    MutualLearningLoss()(la, lb).backward()
    for own, other, grad in ((la0, lb0, la.grad), (lb0, la0, lb.grad)):
        x, y = own.clone().requires_grad_(True), other.clone().requires_grad_(True)
        F.mse_loss(torch.sigmoid(x), torch.sigmoid(y).detach()).backward()
        assert y.grad is None
        assert torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-15) and grad.abs().sum() > 0
        # without the stop-gradient the same value would give twice that gradient
        x2 = own.clone().requires_grad_(True)
        F.mse_loss(torch.sigmoid(x2), torch.sigmoid(other)).mul(2).backward()
        assert torch.allclose(x2.grad, 2 * x.grad, rtol=1e-10, atol=1e-15)


def test_mutual_halves(masks):
    la, lb = pair(masks[:3])
    la.requires_grad_(True)
    lb.requires_grad_(True)
    loss = MutualLearningLoss()
    half_a, half_b = loss.halves(la, lb)
    assert torch.allclose(half_a + half_b, loss(la, lb)) and torch.allclose(half_a, half_b)
    half_a.backward()
    assert la.grad is not None and la.grad.abs().sum() > 0 and lb.grad is None


def test_mutual_softmax_and_reductions(masks):
    la, lb = pair(masks[:4])
    two_a = torch.cat([torch.zeros_like(la), la], dim=1)
    two_b = torch.cat([torch.zeros_like(lb), lb], dim=1)
    # softmax over [0, l]: foreground sigmoid(l), background 1 - sigmoid(l); same squared errors in both channels
    assert torch.allclose(MutualLearningLoss(sigmoid=False)(two_a, two_b), MutualLearningLoss()(la, lb), rtol=1e-5)
    none = MutualLearningLoss(reduction="none")(la, lb)
    assert none.shape == (4,) and (none > 0).all()
    assert torch.allclose(MutualLearningLoss(reduction="sum")(la, lb), none.sum())
    assert torch.allclose(MutualLearningLoss()(la, lb), none.mean())
    # 2D alike
    assert MutualLearningLoss()(la[..., 20], lb[..., 20]) > 0
    with pytest.raises(ValueError):
        MutualLearningLoss()(la, lb[:2])


# ---- negatives of the area-similarity contrastive loss: other cases only, and enough of them ---------------------


def _anchor_grads(loss, la, lb, ids, anchor):
    """Gradients of crop ``anchor``'s loss with respect to both networks' logits of every crop."""
    la, lb = la.clone().requires_grad_(), lb.clone().requires_grad_()
    loss(la, lb, case_ids=ids)[anchor].backward()
    return la.grad.flatten(1).abs().sum(1) + lb.grad.flatten(1).abs().sum(1)


def test_asc_never_contrasts_two_crops_of_one_case(masks):
    """Crops 0 and 1 come from the same case (as a labelled crop and an unlabelled crop of one case do in a
    Semi-CML step): neither is a negative of the other, so crop 0's loss does not depend on crop 1 at all,
    while it does on the crops of other cases; the mask says the same."""
    la, lb = pair(masks[:4])
    ids = ["caseA", "caseA", "caseB", "caseC"]
    loss = AreaSimilarityContrastiveLoss(reduction="none")
    grads = _anchor_grads(loss, la, lb, ids, anchor=0)
    assert grads[1] == 0 and (grads[[0, 2, 3]] > 0).all()
    mask = loss.negative_mask(loss.case_index(ids, 4), loss.case_index(ids, 4))
    assert mask.tolist() == [[False, False, True, True], [False, False, True, True],
                             [True, True, False, True], [True, True, True, False]]
    assert loss.last_negatives.tolist() == [2, 2, 3, 3]
    # the old behaviour (every crop its own case) did contrast them: the defect this guards against
    assert _anchor_grads(AreaSimilarityContrastiveLoss(reduction="none"), la, lb, None, anchor=0)[1] > 0


def test_asc_queue_gives_every_crop_at_least_min_negatives_from_other_cases(masks):
    """Steps of 4 crops from 2 cases (2 crops each, one case recurring every step, as the labelled case at 10%
    labels does): with a queue of earlier crops keyed by case, after warm-up every crop has at least
    ``min_negatives`` negatives, none of its own case; crops with fewer are left out of the loss (0)."""
    la, lb = pair(masks)
    loss = AreaSimilarityContrastiveLoss(queue_size=24, min_negatives=10, reduction="none")
    names = [f"case{i}" for i in range(N_CASES)]
    for step in range(8):
        other = 1 + step % (N_CASES - 1)
        rows = [0, 0, other, other]
        ids = [names[r] for r in rows]
        queued_ids = None if loss.queue_ids is None else loss.queue_ids.clone()
        per_crop = loss(la[rows], lb[rows], case_ids=ids)
        index = loss.case_index(ids, 4)
        keys = index if queued_ids is None else torch.cat([index, queued_ids])
        negative = loss.negative_mask(index, keys)
        assert not (negative & (index[:, None] == keys[None])).any(), "a negative from the crop's own case"
        assert torch.equal(loss.last_negatives, negative.sum(1))
        kept = loss.last_negatives >= 10
        assert (per_crop[~kept] == 0).all() and (per_crop[kept] > 0).all()
        if step >= 4:  # 16+ queued crops of 5+ cases
            assert kept.all() and loss.last_negatives.min() >= 10, (step, loss.last_negatives)
    assert (loss.queue_ids >= 0).all() and len(loss.queue_ids) == 24
    with pytest.raises(ValueError, match="case id"):
        loss(la[:2], lb[:2])


def test_asc_queue_is_in_the_state_dict(masks):
    """A resumed run continues the memory bank: a fresh loss loaded from the state dict gives the same value."""
    la, lb = pair(masks)
    ids = [f"case{i}" for i in range(N_CASES)]
    first = AreaSimilarityContrastiveLoss(queue_size=16, min_negatives=4)
    first(la[:4], lb[:4], case_ids=ids[:4])
    second = AreaSimilarityContrastiveLoss(queue_size=16, min_negatives=4)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second(la[4:], lb[4:], case_ids=ids[4:]), first(la[4:], lb[4:], case_ids=ids[4:]))
    assert torch.equal(second.queue_ids, first.queue_ids)
    with pytest.raises(ValueError, match="queue_size"):
        AreaSimilarityContrastiveLoss(queue_size=8).load_state_dict(first.state_dict())
