"""Cluster re-supervision parts (issue 6) on real BraTS slices: cluster maps, the network, the iteration."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer

from medssl.data import brats_axial_slices, brats_cases
from medssl.engines import WEAK_METHODS, ClusterReSupervisionIteration, weak_or_supervised
from medssl.losses import ClusterReSupervisionLoss, cluster_maps, masked_contributions
from medssl.networks import CAMOutput, CAMSegNet
from medssl.transforms import RandPatchMaskd


@pytest.fixture(scope="module")
def tumour_slices(brats_dir):
    """The largest-tumour axial slice of each of 8 real cases (image (4, H, W), label (1, H, W))."""
    out = []
    for case in brats_cases(brats_dir)[:8]:
        sl = brats_axial_slices([case], with_pixel_labels=True)
        out.append(max(sl, key=lambda s: s["tumour_pixels"]))
    return out


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_cluster_maps_cover_the_tumour_that_a_peaked_cam_misses(tumour_slices):
    """A CAM peaked on the most discriminative part (inside the tumour) thresholded at half its maximum
    under-segments; whole clusters of the same image recover most of the tumour."""
    rows = []
    for s in tumour_slices:
        y = s["label"][0] > 0
        cam = ndimage.gaussian_filter(ndimage.distance_transform_edt(y), 2)
        x = torch.as_tensor(s["image"])[None]
        maps = cluster_maps(x, torch.as_tensor(cam, dtype=torch.float32)[None, None], torch.ones(1), x[:, 0] != 0,
                            num_clusters=4, contribution="cam_mean")["maps"][0, 0].numpy() > 0
        thr = cam >= 0.5 * cam.max()
        rows.append(((maps & y).sum() / y.sum(), (thr & y).sum() / y.sum(), _dice(maps, y), _dice(thr, y)))
    recall_maps, recall_cam, dice_maps, dice_cam = np.mean(rows, axis=0)
    assert recall_maps > recall_cam + 0.3 and dice_maps > dice_cam


def test_cam_mean_contribution_is_the_cam_score_drop_and_negatives_get_empty_maps(tumour_slices):
    s = tumour_slices[0]
    x = torch.as_tensor(s["image"])[None].repeat(2, 1, 1, 1)
    cam = torch.rand(2, 1, *x.shape[2:])
    out = cluster_maps(x, cam, torch.tensor([1.0, 0.0]), x[:, 0] != 0, num_clusters=3, contribution="cam_mean")
    labels = out["labels"][0]
    for k in range(3):  # masking cluster k out of the CAM lowers its global average by drop_k
        masked = cam[0, 0].flatten().clone()
        masked[labels == k] = 0
        assert torch.isclose(cam[0].mean() - masked.mean(), out["drop"][0, k], atol=1e-5)
    assert out["maps"][1].sum() == 0 and out["maps"][0].sum() > 0
    assert (labels[(x[0, 0] == 0).flatten()] == -1).all()  # background pixels are not clustered


def _regions(s):
    """A real tumour slice cut into 4 known regions: 0 outside the brain (-1), the tumour (0) and the rest of
    the brain in three bands of columns (1, 2, 3); one-hot features of them, so k-means (K = 4) finds them."""
    y = torch.as_tensor(s["label"][0] > 0)
    brain = torch.as_tensor(s["image"][0] != 0) | y
    cols = torch.arange(y.shape[1]).expand_as(y)
    lo, hi = [float(torch.quantile(cols[brain & ~y].float(), q)) for q in (1 / 3, 2 / 3)]
    region = torch.where(y, 0, 1 + (cols >= lo).long() + (cols >= hi).long()).masked_fill(~brain, -1)
    features = F.one_hot(region.clamp(min=0), 4).permute(2, 0, 1).float() * brain
    return region, features, brain


def test_masked_contribution_finds_the_region_the_classifier_uses_where_the_cam_mean_is_fooled(tumour_slices):
    """A classifier that looks only at the tumour (its score: the mean FLAIR over the tumour pixels) and a CAM
    peaked on a tumour-free band: re-classifying with each cluster masked out of the input gives the tumour's
    cluster the largest (here the only) contribution, and its map is the tumour; the CAM-mean rule picks the
    band the CAM points at instead - it ranks clusters by the map it is meant to correct."""
    hits = 0
    for s in tumour_slices[:4]:
        region, features, brain = _regions(s)
        y = region == 0
        x = torch.as_tensor(s["image"])[None].float()
        x[0, :, y] = x[0, :, y] + 3.0  # (z-normalised) tumour brighter than the brain mean: a positive score

        def classifier(batch):
            return (batch[:, 0] * y).flatten(1).sum(1) / y.sum()

        cam = (region == 2).float()[None, None] + 0.05
        common = dict(num_clusters=4, image=x, classifier=classifier)
        masked = cluster_maps(features[None], cam, torch.ones(1), brain[None], contribution="masked", **common)
        cam_mean = cluster_maps(features[None], cam, torch.ones(1), brain[None], contribution="cam_mean", **common)
        labels = masked["labels"][0].reshape(y.shape)
        tumour_cluster = int(labels[y].mode().values)
        assert (labels[y] == tumour_cluster).all()
        c = masked["contribution"][0]
        assert int(c.argmax()) == tumour_cluster and c[tumour_cluster] > 0
        assert torch.allclose(c[torch.arange(4) != tumour_cluster], torch.zeros(3), atol=1e-5)
        assert torch.equal(masked["maps"][0, 0] > 0, y)
        hits += int(cam_mean["maps"][0, 0][y].sum() == 0)  # the CAM-mean map misses the tumour entirely
    assert hits == 4


def test_batched_masked_forward_equals_one_forward_per_cluster(tumour_slices):
    """The B*(K+1) stacked forward pass gives the same drops as K + 1 separate forwards per image, on a real
    CAMSegNet classifier and real k-means clusters of real slices; negatives are not re-classified."""
    torch.manual_seed(0)
    net = CAMSegNet(2, 4, (4, 8, 16)).eval()
    x = torch.stack([torch.as_tensor(np.asarray(s["image"]))[:, :64, :64] for s in tumour_slices[:3]]).float()
    k = 5
    with torch.no_grad():
        heads = net.outputs(x)
    out = cluster_maps(heads["features"], heads["cam"], torch.tensor([1.0, 1.0, 0.0]), x[:, 0] != 0, num_clusters=k,
                       image=x, classifier=net.classify)
    labels = out["labels"]
    drops = masked_contributions(net.classify, x, labels, k)
    for b in range(len(x)):
        with torch.no_grad():
            ref = net.classify(x[b:b + 1])[0, 0]
            for j in range(k):
                m = x[b:b + 1].clone()
                m[0, :, (labels[b] == j).reshape(64, 64)] = 0
                torch.testing.assert_close(drops[b, j], ref - net.classify(m)[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["drop"][:2], drops[:2])
    assert (out["drop"][2] == 0).all() and out["maps"][2].sum() == 0
    assert drops.abs().max() > 0  # masking changes the score at all


def test_masked_contribution_needs_the_image_and_the_classifier_and_unknown_rules_are_refused():
    f, cam = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="expected the image and the classifier"):
        cluster_maps(f, cam, torch.ones(1), num_clusters=2)
    with pytest.raises(ValueError, match=r"contribution must be one of \['masked', 'cam_mean'\], got 'gradcam'"):
        ClusterReSupervisionLoss(2, contribution="gradcam")


def test_too_many_clusters_for_the_feature_pixels_is_refused(tumour_slices):
    x = torch.as_tensor(tumour_slices[0]["image"])[None]
    n = int((x[:, 0] != 0).sum())
    with pytest.raises(ValueError, match=f"K={n + 1} exceeds the {n} valid feature pixels"):
        cluster_maps(x, torch.rand(1, 1, *x.shape[2:]), torch.ones(1), x[:, 0] != 0, num_clusters=n + 1,
                     contribution="cam_mean")


@pytest.mark.parametrize("dims", [2, 3])
def test_cam_segnet_heads(dims):
    net = CAMSegNet(dims, 4, (4, 8, 16), reconstruction=True).eval()
    x = torch.randn(2, 4, *([32] * dims))
    out = net.outputs(x)
    assert out["seg"].shape == (2, 1, *([32] * dims)) and out["cam"].shape == (2, 1, *([32] * dims))
    assert out["features"].shape == (2, 4, *([32] * dims)) and out["cls"].shape == (2,)
    torch.testing.assert_close(net.classify(x)[:, 0], out["cls"])
    torch.testing.assert_close(net(x), out["seg"])
    assert net.reconstruct(x).shape == (2, 1, *([32] * dims))
    with pytest.raises(RuntimeError, match="reconstruction=False"):
        CAMSegNet(dims, 4, (4, 8, 16), reconstruction=False).reconstruct(x)


@pytest.mark.parametrize("mode", ["refined", "cam", "gradcam"])
def test_gate_empties_every_output_where_the_classifier_says_tumour_free(tumour_slices, mode):
    net = CAMSegNet(2, 4, (4, 8, 16)).eval()
    x = torch.stack([torch.as_tensor(np.asarray(s["image"]))[:, :64, :64] for s in tumour_slices[:2]]).float()
    with torch.no_grad():
        net.classifier.bias.fill_(-1e4)  # the classifier says "tumour-free" for every image
    gated, free = CAMOutput(net, mode, gate=True)(x), CAMOutput(net, mode, gate=False)(x)
    assert gated.shape == free.shape == (2, 1, 64, 64)
    assert float(gated.abs().max()) == 0.0
    with torch.no_grad():
        net.classifier.bias.fill_(1e4)  # "tumour" for every image: the gate lets the map through
    torch.testing.assert_close(CAMOutput(net, mode, gate=True)(x), CAMOutput(net, mode, gate=False)(x))


def test_iteration_trains_classifier_then_resupervision_and_reconstruction(brats_dir):
    items = [s for s in brats_axial_slices(brats_cases(brats_dir)[:2])][::4]
    data = []
    mask = RandPatchMaskd("image", patch_size=8, mask_ratio=0.5, mask_key="mask").set_random_state(0)
    for s in items:
        img = torch.zeros(4, 96, 96)
        h, w = s["image"].shape[1:]
        img[:, :h, :w] = torch.as_tensor(s["image"])
        d = {"image": img, "class": torch.tensor(s["class"]), "masked_image": img.clone()}
        d["masked_image"] = mask({"image": d["masked_image"]})["image"]
        data.append(d)
    assert {float(d["class"]) for d in data} == {0.0, 1.0}
    torch.manual_seed(0)
    net = CAMSegNet(2, 4, (8, 16, 32))
    resup = ClusterReSupervisionLoss(num_clusters=4)
    it = ClusterReSupervisionIteration(resup, 1.0, reconstruction_weight=1.0, start_iteration=3)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=4,
                                train_data_loader=DataLoader(data, batch_size=4, shuffle=True), network=net,
                                optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=None,
                                iteration_update=it)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (float(e.state.output[0]["resupervision_loss"]), float(e.state.output[0]["reconstruction_loss"]))))
    trainer.run()
    assert [r for r, _ in seen[:2]] == [0.0, 0.0] and all(r > 0 for r, _ in seen[2:])  # from iteration 3 on
    assert all(rec > 0 for _, rec in seen)
    assert resup.last["maps"].shape == (4, 1, 96, 96)


def test_weak_or_supervised_picks_by_the_kind_of_label_and_refuses_unknown_methods():
    assert [weak_or_supervised(m, "image", "pixel") for m in WEAK_METHODS] == ["image", "image", "pixel"]
    weak, sup = object(), object()
    assert weak_or_supervised("cam", weak, sup) is weak and weak_or_supervised("supervised", weak, sup) is sup
    with pytest.raises(ValueError, match=r"method must be one of \['cluster_resupervision', 'cam', 'supervised'\], got 'mil'"):
        weak_or_supervised("mil", weak, sup)
