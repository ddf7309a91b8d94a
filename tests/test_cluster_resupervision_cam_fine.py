"""The fair plain-CAM baseline of cluster_resupervision (benchmark variant ``cam_fine``): a CAM at stride 4 or 8 of
the same U-Net (``CAMSegNet(cam_stride=...)``) and its threshold chosen on validation slices
(``medssl.engines.ThresholdSearch``, wired in evaluate.json), on real BraTS slices."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from medssl.bundles import bundle_path
from medssl.data import brats_axial_slices, brats_cases
from medssl.engines import ThresholdSearch
from medssl.networks import CAMOutput, CAMSegNet

CHANNELS = (8, 16, 32, 64, 128)  # 5 levels, as the bundle's: strides 1, 2, 4, 8 (decoder) and 16 (bottleneck)
# a test case whose files do not exist: reading it would fail
NEVER_READ = {"image": ["/nonexistent/t1.nii.gz"], "label": "/nonexistent/seg.nii.gz", "case": "never_read"}


@pytest.fixture(scope="module")
def case_slices(brats_dir):
    """Every brain slice of the first real case (image (4, H, W), label (1, H, W)), and that case."""
    case = brats_cases(brats_dir)[0]
    return brats_axial_slices([case], with_pixel_labels=True), case


def _crop(image: np.ndarray, centre, size: int) -> torch.Tensor:
    """A ``size``-wide crop of a channel-first image around ``centre`` (zero-padded at the borders)."""
    pad = np.pad(image, [(0, 0)] + [(size, size)] * (image.ndim - 1))
    idx = tuple(slice(c + size - size // 2, c + size + size - size // 2) for c in centre)
    return torch.as_tensor(pad[(slice(None), *idx)]).float()


@pytest.mark.parametrize("dims,size", [(2, 96), (3, 32)])
@pytest.mark.parametrize("stride", [4, 8, 16])
def test_cam_has_the_resolution_of_its_stride_and_averages_to_the_classification_logit(case_slices, dims, size,
                                                                                       stride):
    slices, _ = case_slices
    best = max(range(len(slices)), key=lambda i: slices[i]["tumour_pixels"])
    centre = [int(c) for c in ndimage.center_of_mass(slices[best]["label"][0])]
    if dims == 2:
        x = torch.stack([_crop(slices[i]["image"], centre, size) for i in (best - 2, best, best + 2)])
    else:  # a real 32^3 block around the tumour: the case's slices stacked along the axial axis
        assert size // 2 <= best <= len(slices) - size // 2
        volume = np.stack([s["image"] for s in slices[best - size // 2 : best + size // 2]], axis=-1)
        x = _crop(volume, [*centre, size // 2], size)[None]
    torch.manual_seed(0)
    net = CAMSegNet(dims, 4, CHANNELS, cam_stride=stride).eval()
    with torch.no_grad():
        cam, logit, out = net.class_activation_map(x), net.classify(x), net.outputs(x)
    assert cam.shape == (len(x), 1, *[size // stride] * dims)  # 24x24 at stride 4 of a 96x96 slice
    torch.testing.assert_close(cam.flatten(1).mean(1), logit[:, 0])  # each position's share of the score
    torch.testing.assert_close(out["cls"], logit[:, 0])
    assert out["cam"].shape == out["seg"].shape == (len(x), 1, *[size] * dims)
    assert net.classifier.in_channels == CHANNELS[{16: 4, 8: 3, 4: 2}[stride]]
    if dims == 2:  # Grad-CAM reads the layer the classifier sits on
        assert CAMOutput(net, "gradcam", gate=False)(x).shape == (len(x), 1, size, size)


def test_the_default_cam_is_the_bottleneck_one_as_before():
    default, explicit = CAMSegNet(2, 4, CHANNELS), CAMSegNet(2, 4, CHANNELS, cam_stride=16)
    assert default.cam_stride == 16 and default.cam_layer == "backbone.bottleneck"
    assert repr(default) == repr(explicit) and default.classifier.in_channels == CHANNELS[-1]
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in (default, explicit)]
    assert shapes[0] == shapes[1]
    assert CAMSegNet(2, 4, CHANNELS, cam_stride=4).cam_layer == "backbone.decoders.1"


@pytest.mark.parametrize("channels,stride,allowed", [(CHANNELS, 3, [1, 2, 4, 8, 16]), (CHANNELS, 32, [1, 2, 4, 8, 16]),
                                                      ((8, 16, 32), 8, [1, 2, 4]), (CHANNELS, "4", [1, 2, 4, 8, 16])])
def test_a_stride_the_network_cannot_provide_is_refused_naming_the_allowed_ones(channels, stride, allowed):
    with pytest.raises(ValueError, match=rf"cam_stride must be one of {allowed} .*got {stride!r}".replace("[", r"\[")):
        CAMSegNet(2, 4, channels, cam_stride=stride)


def test_search_picks_the_grid_threshold_with_the_best_validation_dice_and_reads_no_test_case(case_slices, tmp_path):
    """Maps built on real tumour masks: 0.9 inside the eroded tumour, 0.55 on its rim, 0.4 on a ring outside it,
    0.2 elsewhere: thresholds 0.5 (exactly the tumour) beats 0.3 (with the ring), 0.6 (the eroded core) and 0.95
    (nothing). The Dice per threshold is the hand-computed one; tumour-free slices are not scored; the datalist's
    test case (files that do not exist) is never read."""
    slices, case = case_slices
    asked = []

    def constructed(cases):
        asked.extend(c["case"] for c in cases)
        out = []
        for s in brats_axial_slices(cases, with_pixel_labels=True):
            gt = s["label"][0] > 0
            core = ndimage.binary_erosion(gt, iterations=1)
            ring = ndimage.binary_dilation(gt, iterations=2) & ~gt
            p = np.where(core, 0.9, np.where(gt, 0.55, np.where(ring, 0.4, 0.2))).astype(np.float32)
            out.append({"image": p[None], "label": s["label"], "class": s["class"], "case": s["case"]})
        return out

    grid = [0.3, 0.5, 0.6, 0.95]
    datalist = {"validation": [case], "test": [NEVER_READ], "source": "constructed"}
    search = ThresholdSearch(torch.nn.Identity(), datalist, constructed, grid, output_file=str(tmp_path / "t.json"))
    assert search.threshold == 0.5 and search.record == {}  # nothing chosen yet: the default
    assert search.run() == 0.5 and asked == [case["case"]]
    items = [d for d in constructed([case]) if d["class"] == 1.0]
    expected = []
    for t in grid:
        dice = [2 * ((d["image"][0] >= t) & (d["label"][0] > 0)).sum() / ((d["image"][0] >= t).sum() + d["label"].sum())
                for d in items]
        expected.append(float(np.mean(dice)))
    sel = search.record["threshold_selection"]
    assert sel["cases"] == [case["case"]] and sel["split"] == "validation" and sel["num_slices"] == len(items)
    assert len(items) < len(slices)  # the tumour-free (and small-tumour) slices are left out
    np.testing.assert_allclose(sel["dice"], expected, atol=1e-5)
    assert int(np.argmax(expected)) == 1 and search.record["threshold_validation_dice"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "t.json").read_text()) == search.record
    assert ThresholdSearch(torch.nn.Identity(), {}, constructed, []).run() == 0.5  # no grid: no data read


def _evaluate_parser(overrides: dict):
    from monai.bundle import ConfigParser

    configs = bundle_path("cluster_resupervision") / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser.update(overrides)
    return parser


def test_evaluate_stage_chooses_the_threshold_on_the_validation_case_before_the_test_evaluator(case_slices, tmp_path):
    """evaluate.json with tune_threshold: ``initialize`` runs the search with the evaluated checkpoint loaded (its
    classifier says "tumour" everywhere, so the gate lets every map through; a fresh network's would not), on the
    validation case only; the test evaluator then binarises at the chosen threshold and metrics.json records it."""
    _, case = case_slices
    net = CAMSegNet(2, 4, CHANNELS, cam_stride=4)
    with torch.no_grad():
        net.classifier.bias.fill_(1e4)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    datalist = {"training": [], "validation": [case], "test": [NEVER_READ], "source": "constructed"}
    parser = _evaluate_parser({"datalist": datalist, "channels": list(CHANNELS), "cam_stride": 4, "method": "cam",
                               "output": "cam", "tune_threshold": True, "ckpt_path": str(tmp_path / "model.pt"),
                               "output_dir": str(tmp_path), "device": "$torch.device('cpu')", "amp": False})
    parser.get_parsed_content(f"initialize#{parser['initialize'].index('$@threshold_search.run()')}")
    record = json.loads((tmp_path / "threshold.json").read_text())
    chosen = record["threshold"]
    assert chosen in parser["threshold_grid"] and record["threshold_selection"]["cases"] == [case["case"]]
    assert max(record["threshold_selection"]["dice"]) == record["threshold_validation_dice"] > 0  # weights loaded
    assert parser.get_parsed_content("threshold") == chosen
    assert parser.get_parsed_content("validate#postprocessing").transforms[0].threshold == [chosen]
    report = next(h for h in parser.get_parsed_content("validate#handlers") if type(h).__name__ == "WeakSegReport")
    assert report.extra["threshold"] == chosen and report.extra["output"] == "cam"
    assert report.extra["threshold_selection"]["cases"] == [case["case"]]


def test_without_tune_threshold_the_evaluate_stage_reads_no_validation_data_and_keeps_half_the_maximum(tmp_path):
    parser = _evaluate_parser({"datalist": {"training": [], "test": []}, "output_dir": str(tmp_path),
                               "channels": list(CHANNELS)})
    # the search: nothing to choose, so no validation split is needed
    parser.get_parsed_content(f"initialize#{parser['initialize'].index('$@threshold_search.run()')}")
    assert parser.get_parsed_content("threshold") == 0.5 and not (tmp_path / "threshold.json").exists()
    assert parser.get_parsed_content("validate#postprocessing").transforms[0].threshold == [0.5]
