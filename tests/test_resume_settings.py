"""Resuming a training stage compares every setting of the stage (derived from its configs and overrides by
:func:`medssl.bundles.run_settings`, nothing listed by hand) except the few :data:`RESUME_MAY_CHANGE` names:
for every bundle and every stage that trains with a ``ResumableCheckpoint`` (found from the configs), a change
of any other setting is refused naming it; the derivation is checked setting by setting, and two tiny real
runs check the wiring end to end."""

import json
import shutil

import pytest
import torch

from medssl.bundles import (RESUME_MAY_CHANGE, bundle_path, list_bundles, resume_settings, run_settings, run_stage,
                            stage_config_files, stage_settings)
from medssl.cli import _input_error
from medssl.contract import _checkpoints, check_bundle
from medssl.engines import SettingsMismatchError, check_resume_settings


def _resumable_stages(bundle: str) -> list[str]:
    """The stages of ``bundle`` that train (their ``run`` runs ``train#trainer``) with a ResumableCheckpoint."""
    from monai.bundle import ConfigParser

    found = []
    for stage in next(b["stages"] for b in list_bundles() if b["name"] == bundle):
        config = ConfigParser.load_config_files([str(f) for f in stage_config_files(bundle_path(bundle), stage)])
        if any(True for _ in _checkpoints(config)) and "@train#trainer" in json.dumps(config.get("run")):
            found.append(stage)
    return found


CASES = [(b["name"], s) for b in list_bundles() for s in _resumable_stages(b["name"])]


def _changed(value):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    return 1  # None


def _exempt(key: str) -> bool:
    return bool(set(key.split("#")) & set(RESUME_MAY_CHANGE))


def _refusal(saved: dict, now: dict) -> str:
    with pytest.raises(SettingsMismatchError) as e:
        check_resume_settings("ckpt/train_checkpoint.pt", saved, now)
    return str(e.value)


def test_every_training_stage_is_found():
    stages = {s for _, s in CASES}
    assert {"train", "pretrain", "prel"} <= stages, stages
    assert all((b, "train") in CASES for b in {b for b, _ in CASES})


@pytest.mark.parametrize("bundle,stage", CASES)
def test_a_change_of_any_setting_but_the_exempt_ones_is_refused_naming_it(bundle, stage):
    """Each top-level setting of the stage, changed alone: refused naming it, unless RESUME_MAY_CHANGE exempts it
    (then the settings are equal)."""
    settings = stage_settings(bundle, stage)
    base = resume_settings(bundle, stage, seed=settings["seed"])  # as run_settings(@datalist, seed=@seed) has it
    assert isinstance(base["seed"], int)
    refused = 0
    for key, value in settings.items():
        new = _changed(value)
        now = resume_settings(bundle, stage, {key: new}, seed=new if key == "seed" else settings["seed"])
        if _exempt(key):
            assert now == base, f"{bundle} {stage}: {key} is exempt, yet the settings differ"
            continue
        said = _refusal(base, now)
        assert said.startswith("ckpt/train_checkpoint.pt: holds a run with other settings (" + key + ": "), said
        assert said.count(" there, ") == 1, said  # that setting alone
        assert "use another ckpt_dir, or set resume to false to train afresh over it" in said
        refused += 1
    assert refused >= 10  # not vacuous


@pytest.mark.parametrize("bundle,stage", CASES)
def test_the_exempt_settings_and_nested_ones_may_change(bundle, stage):
    """A new budget, more workers (also a nested ``train#dataloader#num_workers``), other places: the same
    settings; the resolved seed and the datalist's content replace their expressions."""
    base = resume_settings(bundle, stage)
    same = resume_settings(bundle, stage, {"max_epochs": 1000, "num_workers": 4, "train#dataloader#num_workers": 3,
                                           "val_interval": 7, "patience": 0, "snapshot_steps": [5], "resume": False,
                                           "ckpt_dir": "/elsewhere", "dataset_dir": "/data", "datalist_file": "x.json",
                                           "device": "$torch.device('cpu')", "bundle_root": "/b"})
    assert same == base
    assert not any(_exempt(k) for k in base) and "train#dataloader#num_workers" not in base
    assert resume_settings(bundle, stage, seed=5)["seed"] == 5


def test_a_nested_override_is_named_by_its_id():
    for stage in ("train", "pretrain"):
        base = resume_settings("context_restoration", stage)
        now = resume_settings("context_restoration", stage, {"network_def#channels": [8, 16, 32, 64, 128]})
        said = _refusal(base, now)
        assert "(network_def#channels: [16, 32, 64, 128, 256] there, [8, 16, 32, 64, 128] now)" in said, said


def test_the_datalist_counts_by_its_cases_not_their_folder():
    cases = {"training": [{"image": f"/d/{c}/{c}_flair.nii.gz", "case": c} for c in "abc"],
             "validation": [{"image": "/d/v/v_flair.nii.gz", "label": "/d/v/v_seg.nii.gz", "case": "v"}]}
    moved = json.loads(json.dumps(cases).replace("/d/", "/elsewhere/"))
    other = {**cases, "training": cases["training"][:2]}
    base = resume_settings("context_restoration", "train", datalist=cases)
    assert resume_settings("context_restoration", "train", datalist=moved) == base
    assert "(datalist: " in _refusal(base, resume_settings("context_restoration", "train", datalist=other))


def test_many_differences_are_counted_and_an_old_checkpoint_is_refused():
    """A checkpoint saved with the old hand-kept list (the same values, far fewer settings) is refused, the
    message showing the first few, counting them all and saying why."""
    now = resume_settings("context_restoration", "train", datalist={"training": [{"image": "a", "case": "a"}]}, seed=0)
    old = {k: now[k] for k in ("datalist", "seed", "label_fraction", "learning_rate", "epoch_length", "batch_size",
                               "roi_size", "dropout", "init")}
    said = _refusal(old, now)
    assert f"{len(now) - len(old)} settings differ in all" in said and ", ..." in said
    assert "saved by an older medssl" in said
    assert said.count(" there, ") == 6
    check_resume_settings("x.pt", now, dict(now))  # equal: resumes
    check_resume_settings("x.pt", None, now)  # a checkpoint without settings is not checked


def test_without_a_stage_being_run_it_compares_what_it_is_given():
    with pytest.warns(UserWarning, match="compares only datalist, seed"):
        got = run_settings({"training": [{"image": "a", "case": "a"}]}, seed=3)
    assert set(got) == {"datalist", "seed"} and got["seed"] == 3


def test_the_exempt_list_is_documented():
    from conftest import REPO

    for doc in ("docs/user_guide.md", "docs/adding_a_bundle.md"):
        text = (REPO / doc).read_text()
        assert "RESUME_MAY_CHANGE" in text and not [n for n in RESUME_MAY_CHANGE if f"`{n}`" not in text], doc


def test_the_contract_refuses_a_hand_kept_list(tmp_path):
    root = tmp_path / "context_restoration"
    shutil.copytree(bundle_path("context_restoration"), root)
    pre = root / "configs" / "pretrain.json"
    cfg = json.loads(pre.read_text())
    cfg["run_settings"] = {"num_swaps": "@num_swaps"}
    next(c for _, c in _checkpoints(cfg))["settings"] = "@run_settings"
    pre.write_text(json.dumps(cfg))
    problems = "\n".join(check_bundle(root))
    assert "'run_settings': a hand-kept list of run settings" in problems
    assert "train#handlers#1: a ResumableCheckpoint whose settings are not derived" in problems


def test_a_real_resume_with_another_patch_size_is_refused_before_training_and_a_longer_one_resumes(tmp_path):
    """context_restoration pretrain, one iteration into a folder; again with patch_size [4, 4, 4] and num_samples
    2 (the reported case): refused naming both, the checkpoint untouched; again with only max_epochs 2: resumes."""
    tiny = {"ckpt_dir": str(tmp_path), "epoch_length": 1, "num_samples": 1, "logging_file": False,
            "device": "$torch.device('cpu')", "pretext_health#num_crops": 2}
    run_stage("context_restoration", "pretrain", max_epochs=1, **tiny)
    ckpt = tmp_path / "pretrain_checkpoint.pt"
    first = torch.load(ckpt, weights_only=False)
    record = json.loads((tmp_path / "run.json").read_text())
    assert first["trainer"]["iteration"] == 1 and first["settings"]["seed"] == 0
    assert first["settings"]["patch_size"] == [8, 8, 8] and first["settings"]["num_samples"] == 1
    assert record["run_settings"] == first["settings"] and record["run_settings"]["init"] == "method"
    assert not any(_exempt(k) for k in first["settings"])
    before = ckpt.read_bytes()
    with pytest.raises(Exception) as e:
        run_stage("context_restoration", "pretrain", max_epochs=1, **{**tiny, "num_samples": 2},
                  patch_size=[4, 4, 4])
    cause = _input_error(e.value)  # MONAI wraps it in 'Failed to evaluate'; medssl run reports the cause
    assert isinstance(cause, SettingsMismatchError), e.value
    said = str(cause)
    assert said.startswith(f"{ckpt}: holds a run with other settings (")
    assert "num_samples: 1 there, 2 now" in said and "patch_size: [8, 8, 8] there, [4, 4, 4] now" in said
    assert ckpt.read_bytes() == before and json.loads((tmp_path / "run.json").read_text()) == record
    run_stage("context_restoration", "pretrain", max_epochs=2, **tiny)
    assert torch.load(ckpt, weights_only=False)["trainer"]["iteration"] == 2
