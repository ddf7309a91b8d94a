"""`evaluate --save_figures N` (issue 14): one PNG per test case with its Dice in the title, on real data;
the bundles' wiring; the benchmark's method-above-baseline figures."""

import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from conftest import bundle_runner

PANEL_PX = 240  # one panel's width in pixels (2.4 inches at 100 dpi)


class Threshold(torch.nn.Module):
    """A model-free segmenter of z-scored BraTS volumes: TC = bright T1ce, WT = bright FLAIR, ET = very
    bright T1ce (logits whose sigmoid passes 0.5 there), so that each case has its own, imperfect Dice."""

    def forward(self, x):
        return torch.cat([x[:, 2:3] - 1.0, x[:, 0:1] - 1.0, x[:, 2:3] - 2.0], 1)


def _title_dice(title: str) -> dict:
    return {r: float(v) for r, v in re.findall(r"(\w+) (\d\.\d{3})", title.split("Dice", 1)[1])}


def test_figures_of_real_brats_cases_match_metrics_json(tmp_path, brats_dir):
    """Through a MONAI evaluator on three real cases: the first two are drawn (4 modalities + truth +
    prediction = 6 panels), at a slice with tumour, with the per-case Dice of metrics.json in the title."""
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.inferers import SimpleInferer
    from monai.transforms import (Activationsd, AsDiscreted, Compose, ConvertToMultiChannelBasedOnBratsClassesd,
                                  EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd)

    from medssl.data import BRATS_MODALITIES, brats_cases
    from medssl.engines import CaseFigures, MetricsReport

    keys, regions = ["image", "label"], ["TC", "WT", "ET"]
    load = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
                    ConvertToMultiChannelBasedOnBratsClassesd("label"),
                    NormalizeIntensityd("image", nonzero=True, channel_wise=True)])
    cases = brats_cases(brats_dir)[:3]
    figures = CaseFigures(str(tmp_path), 2, regions, BRATS_MODALITIES)
    labels = {}
    evaluator = SupervisedEvaluator(
        torch.device("cpu"), DataLoader(Dataset(cases, load), batch_size=1), network=Threshold(),
        inferer=SimpleInferer(), postprocessing=Compose([Activationsd("pred", sigmoid=True),
                                                         AsDiscreted("pred", threshold=0.5)]),
        key_val_metric={"dice": MeanDice(include_background=True, save_details=True,
                                         output_transform=from_engine(["pred", "label"]))},
        val_handlers=[MetricsReport(str(tmp_path / "metrics.json"), regions, metrics=["dice"]), figures])
    evaluator.add_event_handler(Events.ITERATION_COMPLETED,
                                lambda e: labels.update({e.state.batch[0]["case"]: e.state.output[0]["label"]}))
    evaluator.run()

    per_case = {row["case"]: row["dice"] for row in json.loads((tmp_path / "metrics.json").read_text())["per_case"]}
    drawn = [c["case"] for c in cases[:2]]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(f"{c}.png" for c in drawn)
    assert list(figures.titles) == drawn
    for case in drawn:
        png = imread(str(tmp_path / "figures" / f"{case}.png"))
        assert png.shape[1] == PANEL_PX * (len(BRATS_MODALITIES) + 2)
        title = figures.titles[case]
        assert title.startswith(case)
        assert _title_dice(title) == {r: round(v, 3) for r, v in per_case[case].items()}
        assert figures.dice[case] == pytest.approx(per_case[case], abs=1e-6)
        assert 0 < min(per_case[case].values()) and max(per_case[case].values()) < 1  # imperfect: a real check
        z = int(re.search(r"axial slice (\d+)", title).group(1))
        area = labels[case].any(0).sum((0, 1))
        assert area[z] == area.max() > 0  # the slice with the most tumour


def test_2d_case_and_the_empty_region_convention(tmp_path, nuclei_dir):
    """A real DSB image (2-D, 1 channel: 3 panels); Dice 1 for a perfect prediction and for an empty region
    predicted empty, 0 for a missed or a hallucinated region (as metrics.json scores them); 0 cases: off."""
    from PIL import Image

    from medssl.engines import CaseFigures
    from medssl.engines.figures import case_dice, figure_slice

    name = sorted((nuclei_dir / "images").glob("*.png"))[0].name
    image = torch.as_tensor(np.asarray(Image.open(nuclei_dir / "images" / name).convert("L"), np.float32)).T[None]
    truth = torch.as_tensor(np.asarray(Image.open(nuclei_dir / "labels" / name)) > 0).T[None].float()
    empty = torch.zeros_like(truth)
    one_hot = torch.cat([1 - truth, truth])  # background first, as dfr_barlow's postprocessing gives it
    assert case_dice(one_hot, one_hot, 1).tolist() == [1.0]
    assert case_dice(torch.cat([truth, empty, truth]), torch.cat([truth, empty, empty]), 3).tolist() == [1.0, 1.0, 0.0]
    assert case_dice(empty, truth, 1).tolist() == [0.0]
    assert figure_slice(truth) is None and figure_slice(torch.zeros(1, 4, 4, 6)) == 3

    figures = CaseFigures(str(tmp_path), 1, ["nucleus"], ["image"], origin="upper")
    path = figures.draw(name[:-4], image, one_hot, one_hot)
    assert imread(str(path)).shape[1] == PANEL_PX * 3
    assert figures.titles[name[:-4]] == f"{name[:-4]}  Dice nucleus 1.000"

    class Engine:  # num_cases 0 (the bundles' default) attaches nothing
        def add_event_handler(self, *args):
            raise AssertionError("attached")

    CaseFigures(str(tmp_path / "off"), 0, ["nucleus"]).attach(Engine())


@pytest.mark.slow
def test_bundle_evaluate_save_figures(tmp_path, nuclei_dir):
    """`python -m monai.bundle run` evaluate of dfr_barlow with --save_figures 2: the first two test cases,
    each in the orientation of its PNG, titled with its metrics.json Dice (a seeded untrained network)."""
    from monai.bundle import ConfigParser

    from medssl.data import nuclei_cases, write_datalist

    bundle, configs, monai_run = bundle_runner("dfr_barlow")
    cases = nuclei_cases(nuclei_dir)[:5]
    dl = write_datalist({"training": [dict(c, labelled=True) for c in cases[:1]], "validation": cases[1:2],
                         "test": cases[2:5]}, tmp_path / "datalist.json", nuclei_dir)
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(nuclei_dir)})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    monai_run("evaluate", "--dataset_dir", nuclei_dir, "--datalist_file", dl, "--ckpt_dir", tmp_path,
              "--output_dir", tmp_path / "eval", "--save_figures", 2)
    per_case = json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_case"]
    assert len(per_case) == 3
    pngs = sorted((tmp_path / "eval" / "figures").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(c["case"] for c in cases[2:4])
    for png in pngs:
        assert imread(str(png)).shape[1] == PANEL_PX * 3


@pytest.mark.slow
def test_benchmark_stacks_method_above_baseline(tmp_path, nuclei_copy):
    """`run_benchmark(..., figures=1)` at the smoke budget: each fold's first test case drawn by the method and
    by the baseline, stacked in out/figures/fold{k}_f1/."""
    from medssl.apps.benchmark import run_benchmark

    out = tmp_path / "bench"
    run_benchmark("dfr_barlow", str(nuclei_copy(8)), fractions="1.0", folds=2, seed=0, budget="smoke",
                  progress=False, logging_file=False, out=str(out), variants="method,baseline", figures=1)
    for fold in (0, 1):
        method = list((out / f"fold{fold}" / "f1" / "method" / "figures").glob("*.png"))
        assert len(method) == 1
        baseline = out / f"fold{fold}" / "f1" / "baseline" / "figures" / method[0].name
        stacked = imread(str(out / "figures" / f"fold{fold}_f1" / method[0].name))
        one = imread(str(method[0]))
        assert baseline.is_file() and stacked.shape[0] > 2 * one.shape[0] and stacked.shape[1] >= one.shape[1]
        assert not np.array_equal(one, imread(str(baseline)))  # two models, two figures
