"""PReL's pseudo-label term (Zhang et al. 2023: the student re-learns the teacher's soft pseudo-labels) is
minimised by a student equal to the teacher, on a real crop: the loss the bundle's prel stage builds, with
the teacher's probabilities made from a real FLAIR crop and its whole-tumour mask."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from medssl.bundles import bundle_path, stage_config_files

CROP = (64, 64, 48)


@pytest.fixture(scope="module")
def teacher_logits(brats_dir) -> torch.Tensor:
    """``(1, 1, 64, 64, 48)`` logits of a soft teacher on a real case: the whole-tumour mask, blurred (a
    teacher unsure at the boundary), plus the standardised FLAIR (intensity evidence), so that the
    probabilities span (0, 1) as a trained network's do."""
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    seg = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj) > 0
    flair = np.asarray(nib.load(case / f"{case.name}_flair.nii.gz").dataobj, dtype=np.float32)
    start = [int(np.mean(np.nonzero(seg)[i])) - c // 2 for i, c in enumerate(CROP)]
    start = [min(max(a, 0), n - c) for a, n, c in zip(start, seg.shape, CROP)]
    box = tuple(slice(a, a + c) for a, c in zip(start, CROP))
    mask = torch.from_numpy(seg[box].astype(np.float32))[None, None]
    image = torch.from_numpy(flair[box])[None, None]
    image = (image - image[image > 0].mean()) / image[image > 0].std()
    soft = F.avg_pool3d(mask, 7, stride=1, padding=3)
    return 3 * (2 * soft - 1) + 0.5 * image


def pseudo_loss():
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(bundle_path("semi_cml"), "prel")])
    return parser.get_parsed_content("pseudo_loss")


def _loss_and_grad(loss_fn, student_logits: torch.Tensor, target: torch.Tensor):
    x = student_logits.clone().requires_grad_(True)
    loss = loss_fn(x, target)
    loss.backward()
    return float(loss), x.grad


def test_the_teacher_is_soft_on_a_real_crop(teacher_logits):
    p = torch.sigmoid(teacher_logits)
    assert 0.05 < float(((p > 0.1) & (p < 0.9)).float().mean()) < 0.6  # many voxels neither 0 nor 1
    assert float((p > 0.5).float().mean()) > 0.02  # the tumour is in the crop


def test_pseudo_label_loss_is_minimised_by_a_student_equal_to_the_teacher(teacher_logits):
    loss_fn, target = pseudo_loss(), torch.sigmoid(teacher_logits)
    at_teacher, grad = _loss_and_grad(loss_fn, teacher_logits, target)
    assert float(grad.abs().max()) < 1e-9  # a stationary point; the loss is convex in the logits
    sharpened, _ = _loss_and_grad(loss_fn, 2 * teacher_logits, target)
    binarised, _ = _loss_and_grad(loss_fn, 10 * torch.sign(teacher_logits), target)
    softened, _ = _loss_and_grad(loss_fn, 0.5 * teacher_logits, target)
    assert at_teacher < sharpened < binarised
    assert at_teacher < softened


def test_minimising_it_from_scratch_recovers_the_teacher(teacher_logits):
    loss_fn, target = pseudo_loss(), torch.sigmoid(teacher_logits)
    x = torch.zeros_like(teacher_logits, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(x, target).backward()
        opt.step()
    assert float((torch.sigmoid(x) - target).abs().max()) < 0.02


def test_the_earlier_dice_ce_term_was_not_minimised_at_the_teacher(teacher_logits):
    """Why the term changed: DiceCE (sigmoid) against soft targets has a non-zero gradient at the teacher and
    scores a sharpened student lower - re-learning with it sharpens the pseudo-labels."""
    dice_ce, target = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5), torch.sigmoid(teacher_logits)
    at_teacher, grad = _loss_and_grad(dice_ce, teacher_logits, target)
    sharpened, _ = _loss_and_grad(dice_ce, 2 * teacher_logits, target)
    assert float(grad.abs().max()) > 1e-6 and sharpened < at_teacher
