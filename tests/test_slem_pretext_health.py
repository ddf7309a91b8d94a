"""slem's pretraining measures its pretext's health on held-out crops of the real BraTS sample when it completes
(pretext_health.json): the block-mix accuracy beside chance and the intensity-histogram probe, or for
pretext=context_restoration the restoration MSE beside the identity's. A tiny in-process run of each; the
numbers mean nothing, the wiring does."""

import functools
import json

import pytest

from monai.bundle import ConfigParser

from medssl.bundles import run_stage
from medssl.contract import stage_files
from medssl.engines import PretextHealth, block_mix_health, restoration_health

from conftest import REPO

BUNDLE = REPO / "bundles" / "slem"


def _parser(**overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in stage_files("pretrain")])
    parser.update({"device": "$torch.device('cpu')", "bundle_root": str(BUNDLE), **overrides})
    return parser


@pytest.mark.parametrize("pretext", ["block_mix", "context_restoration"])
def test_the_pretext_switch_picks_the_measure_and_the_handler_is_wired_by_id(pretext):
    parser = _parser(pretext=pretext)
    health = parser.get_parsed_content("pretext_health")
    assert isinstance(health, PretextHealth) and health.network is parser.get_parsed_content("network")
    assert any(h is health for h in parser.get_parsed_content("train#handlers"))
    if pretext == "block_mix":
        assert isinstance(health.measure, functools.partial) and health.measure.func is block_mix_health
        assert health.measure.keywords["grid"] == [2, 2, 1]
        table = parser.get_parsed_content("train#block_mix#0").combinations
        assert (health.measure.keywords["combinations"] == table).all()
        assert health.fit_data and health.num_crops == 32
        assert parser.get_parsed_content("train#block_mix#0").mixer.normalize_blocks == "histogram"
    else:
        assert health.measure is restoration_health and not health.fit_data  # it fits nothing


@pytest.mark.parametrize("pretext", ["block_mix", "context_restoration"])
def test_a_tiny_pretraining_writes_its_pretext_health(tmp_path, pretext):
    run_stage("slem", "pretrain", ckpt_dir=str(tmp_path), max_epochs=1, epoch_length=2, logging_file=False,
              device="$torch.device('cpu')", pretext=pretext,
              **{"pretext_health#num_crops": 8, "pretext_health#num_fit_crops": 16})
    h = json.loads((tmp_path / "pretext_health.json").read_text())
    assert {"metric", "value", "trivial", "trivial_rule", "learned", "crops", "cases"} <= set(h)
    assert h["crops"] == 8 and h["cases"] >= 1 and isinstance(h["learned"], bool)
    if pretext == "block_mix":
        assert h["metric"] == "block_mix_accuracy" and h["trivial"] == 0.01 and h["trivial_rule"] == "chance"
        assert isinstance(h["probe"], float) and 0.0 <= h["probe"] <= 1.0 and 0.0 <= h["value"] <= 1.0
        assert isinstance(h["probe_rule"], str) and h["probe_block_accuracy"] == 0.25  # equalised blocks
    else:
        assert h["metric"] == "restoration_mse" and h["trivial_rule"] == "identity" and "probe" not in h
