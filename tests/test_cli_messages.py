"""The command line a new user meets: help that lists settings, one line (exit 2) for a bad setting or a
failed download, the data found beside a checkout, and one line when the test data is missing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medssl.bundles import SettingError, check_overrides, stage_settings
from medssl.utils import data_root

REPO = Path(__file__).resolve().parents[1]


def test_stage_help_lists_its_settings_with_defaults(medssl):
    r = medssl("run", "context_restoration", "train", "--help")
    assert r.returncode == 0
    assert "--label_fraction 1.0" in r.stdout and "--seed 0" in r.stdout and "--max_epochs" in r.stdout
    r = medssl("run", "--help")
    assert r.returncode == 0 and "context_restoration" in r.stdout and "pretrain, train, evaluate" in r.stdout
    r = medssl("run", "slem", "prel", "--help")
    assert r.returncode == 2 and "has no stage 'prel'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_command_help_has_types_and_one_line_per_setting(medssl):
    r = medssl("benchmark", "--help")
    text = r.stdout + r.stderr  # fire pages its help to stderr without a terminal
    assert r.returncode == 0
    assert "Optional[" not in text and "k of the cross-validation" in text and "Type: int" in text


@pytest.mark.parametrize("setting,value,expected", [("label_fraction", "abc", "a number"),
                                                     ("seed", "x", "an integer"), ("max_epochs", "1.5", "an integer")])
def test_a_bad_setting_is_one_line_naming_it_with_exit_2(medssl, setting, value, expected):
    r = medssl("run", "context_restoration", "train", f"--{setting}", value)
    assert r.returncode == 2
    line, = r.stderr.strip().splitlines()[-1:]
    assert f"setting '{setting}'" in line and repr(value if setting != "max_epochs" else 1.5) in line
    assert expected in line and "Traceback" not in r.stderr


def test_overrides_of_the_right_kind_pass_and_every_stage_has_settings():
    check_overrides("context_restoration", "train", {"label_fraction": 0.1, "seed": 3, "max_epochs": 2,
                                                     "device": "$torch.device('cpu')", "train#dataloader#num_workers": 1})
    with pytest.raises(SettingError, match="'resume'.*true or false"):
        check_overrides("context_restoration", "train", {"resume": 3})
    assert {"seed", "label_fraction"} <= set(stage_settings("slem", "pretrain"))


def test_a_failed_download_is_one_line(medssl, tmp_path, monkeypatch):
    from medssl.data import sample

    monkeypatch.setattr(sample, "SOURCE_URL", "http://127.0.0.1:9/")  # as $MEDSSL_BRATS_SOURCE_URL names a mirror
    r = medssl("data", "download", "--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("medssl: DownloadError: cannot download http://127.0.0.1:9/")


def test_data_is_found_beside_the_checkout(monkeypatch):
    monkeypatch.delenv("MEDSSL_DATA_DIR", raising=False)
    if (REPO.parent / "shared" / "data").is_dir():
        assert data_root().resolve() == (REPO.parent / "shared" / "data").resolve()
    monkeypatch.setenv("MEDSSL_DATA_DIR", "/somewhere/else")
    assert data_root() == Path("/somewhere/else")


def test_without_data_the_tests_stop_at_once_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_kmeans.py")],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "MEDSSL_DATA_DIR": str(tmp_path / "none")})
    assert r.returncode == 4 and "passed" not in r.stdout and "error" not in r.stdout.lower().replace("exit:", "")
    assert f"the tests need the real data sets brats18_2mm, dsb2018_nuclei under {tmp_path / 'none'}" in r.stdout


def test_monai_bundle_run_refuses_a_bad_setting_in_one_line(tmp_path):
    """The same check under MONAI's own runner (every config's first ``initialize`` expression)."""
    bundle = REPO / "bundles" / "context_restoration"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        "['configs/train.json','configs/evaluate.json']", "--seed", "x", "--ckpt_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=bundle)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("monai.bundle run: setting 'seed' of bundle context_restoration: got 'x', "
                                                 "expected an integer (default 0)")
    assert not list(tmp_path.iterdir())  # refused before anything was built or written


def test_an_unknown_option_of_a_command_is_refused_before_it_runs(medssl, tmp_path):
    """Fire would run the whole benchmark and only then fail on the left-over ``--progress False``."""
    out = tmp_path / "never"
    r = medssl("benchmark", "slem", "--data_dir", str(tmp_path), "--out", str(out), "--progress", "False")
    assert r.returncode == 2 and not out.exists()
    line, = r.stderr.strip().splitlines()
    assert "unknown option --progress for benchmark" in line and "--workers" in line
    r = medssl("zoo", "package", "slem", "--weigths", str(tmp_path))
    assert r.returncode == 2 and "did you mean --weights?" in r.stderr


@pytest.mark.parametrize("typed, expected", [("false", False), ("False", False), ("TRUE", True), ("0", False), (1, True)])
def test_the_booleans_users_type_are_booleans(typed, expected):
    assert check_overrides("context_restoration", "train", {"resume": typed})["resume"] is expected


def test_an_unknown_setting_id_is_refused_naming_the_nearest(medssl):
    with pytest.raises(SettingError, match=r"'learning_rat'.*no such id.*did you mean 'learning_rate'"):
        check_overrides("context_restoration", "train", {"learning_rat": 0.1})
    with pytest.raises(SettingError, match=r"'train#dataloader#num_workerz'.*no such id"):
        check_overrides("context_restoration", "train", {"train#dataloader#num_workerz": 1})
    r = medssl("run", "context_restoration", "train", "--learning_rat", "0.1")
    assert r.returncode == 2 and "did you mean 'learning_rate'" in r.stderr and "Traceback" not in r.stderr


def test_a_mistyped_bundle_or_stage_is_one_line_naming_what_there_is(medssl):
    r = medssl("run", "context_restoraton", "train")
    line, = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "no bundle named 'context_restoraton'" in line and "context_restoration" in line
    r = medssl("run", "context_restoration", "finetune")
    line, = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "has no stage 'finetune'" in line and "'prel'" not in line and "'pretrain'" in line


def test_evaluating_a_folder_without_a_model_says_to_train_first(medssl, tmp_path):
    r = medssl("run", "context_restoration", "evaluate", "--ckpt_dir", str(tmp_path / "empty"))
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "model.pt: missing; expected a trained model (run the train stage" in line
    assert "pretrain" not in line


def test_ctrl_c_is_one_line_saying_the_same_command_resumes(medssl, monkeypatch):
    from medssl import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.CLI, "benchmark", lambda self, bundle, data_dir="": interrupted())
    r = medssl("benchmark", "slem", "--data_dir", "x")
    line, = r.stderr.strip().splitlines()
    assert r.returncode == 130 and "interrupted; run the same command again to resume it" in line


def test_monai_label_runs_in_medssls_own_interpreter(monkeypatch, tmp_path):
    """`medssl label serve` from a venv that is not activated: the server command must not depend on PATH."""
    from medssl.label import monailabel_command

    monkeypatch.setenv("PATH", str(tmp_path))  # no python, no monailabel script on it
    assert monailabel_command() == [sys.executable, "-m", "monailabel.main"]
