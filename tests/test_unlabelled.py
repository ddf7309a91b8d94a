"""Unlabelled scans are first-class (issue 14): a case without a segmentation goes to ``training`` as
``"labelled": false`` with no ``label``; pretraining uses it, semi-supervised training uses it as its
unlabelled stream, supervised training and evaluation use labelled cases only (and say how many), and a
data set without any label is refused by supervised training with one DataError naming the folder.
On copies of the real BraTS sample and DSB nuclei with most labels removed; tiny budgets."""

import json
import logging
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medssl.bundles import bundle_path, stage_config_files
from medssl.data import DataError, brats_cases, labelled, make_fold, make_split, nuclei_cases

from conftest import REPO

TINY = ["--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1", "--roi_size", "[48,48,48]",
        "--num_samples", "1"]


@pytest.fixture
def data_log():
    """Messages logged by medssl.data (a handler on that logger survives the bundles' logging.conf)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("medssl.data")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def _unlabel_brats(root: Path, keep: int) -> tuple[set, set]:
    """Remove the seg of every case but the first ``keep``: (labelled names, unlabelled names)."""
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    for d in cases[keep:]:
        (d / f"{d.name}_seg.nii.gz").unlink()
    return {d.name for d in cases[:keep]}, {d.name for d in cases[keep:]}


def _parsed(bundle: str, stage: str, item: str, **overrides):
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(bundle_path(bundle), stage)])
    parser.update(overrides)
    return parser.get_parsed_content(item)


def _names(items) -> set:
    return {c["case"] for c in items}


def _check_split(path: Path, lab: set, unl: set):
    d = json.loads(path.read_text())
    train = {c["case"]: c for c in d["training"]}
    assert unl <= set(train) and all(train[c]["labelled"] is False and "label" not in train[c] for c in unl)
    assert all("label" in c for k in ("validation", "test") for c in d[k])  # labelled cases only
    assert _names(d["validation"]) | _names(d["test"]) | {c for c in train if c in lab} == lab
    assert any(c["labelled"] for c in d["training"])
    return d


def test_brats_check_split_and_folds_accept_unlabelled_cases(brats_copy, medssl):
    root = brats_copy(10)
    lab, unl = _unlabel_brats(root, 5)
    code, out, err = medssl("data", "check", root)
    assert code == 0 and "OK, 10 cases (5 labelled, 5 without a label)" in out, err
    code, out, err = medssl("data", "split", root, "--out", root.parent / "split.json", "--seed", "0")
    assert code == 0 and "5 without a label" in out, err
    _check_split(root.parent / "split.json", lab, unl)

    # unlabelled scans do not move the labelled cases: the split of the labelled ones is unchanged
    cases = brats_cases(root)
    only = [c for c in cases if "label" in c]
    for f in (0.2, 1.0):
        a, b = make_split(cases, f, seed=3), make_split(only, f, seed=3)
        assert a["test"] == b["test"] and a["validation"] == b["validation"]
        assert [c for c in a["training"] if "label" in c] == b["training"]
        fa, fb = make_fold(cases, 1, 5, f, seed=0), make_fold(only, 1, 5, f, seed=0)
        assert fa["test"] == fb["test"] and [c for c in fa["training"] if "label" in c] == fb["training"]
        assert unl <= _names(fa["training"]) and not any(c["labelled"] for c in fa["training"] if c["case"] in unl)
    # folds: every labelled case tested once; the unlabelled ones train in every fold
    tested = [c["case"] for k in range(5) for c in make_fold(cases, k, 5, 1.0)["test"]]
    assert sorted(tested) == sorted(lab)
    with pytest.raises(DataError, match="5 labelled cases \\(and 5 without a label\\) cannot make 6 folds"):
        make_fold(cases, 0, 6)


def test_nuclei_check_split_and_dfr_barlow_stages(nuclei_copy, medssl, data_log):
    root = nuclei_copy(12)
    images = sorted(p.stem for p in (root / "images").glob("*.png"))
    lab, unl = set(images[:5]), set(images[5:])
    for name in unl:
        (root / "labels" / f"{name}.png").unlink()
    code, out, err = medssl("data", "check", root)
    assert code == 0 and "OK, 12 cases (5 labelled, 7 without a label)" in out, err
    code, out, err = medssl("data", "split", root, "--out", root.parent / "split.json")
    assert code == 0, err
    d = _check_split(root.parent / "split.json", lab, unl)
    assert {c["case"] for c in nuclei_cases(root) if "label" not in c} == unl

    common = {"dataset_dir": str(root), "datalist_file": str(root.parent / "split.json")}
    pre = _parsed("dfr_barlow", "pretrain", "train#dataset#data", **common)
    assert _names(pre) == _names(d["training"]) and unl <= _names(pre)  # pretraining: every training case
    sup = _parsed("dfr_barlow", "train", "train#dataset#data", **common)
    assert _names(sup) == {c["case"] for c in d["training"] if c["labelled"]} and not (_names(sup) & unl)
    assert any(f"supervised training uses {len(sup)} labelled case(s) of {len(d['training'])}" in m for m in data_log)

    for name in lab:  # no label at all: supervised training refuses, pretraining still takes every image
        (root / "labels" / f"{name}.png").unlink()
    assert len(_parsed("dfr_barlow", "pretrain", "train#dataset#data", dataset_dir=str(root))) == 12
    with pytest.raises(Exception) as e:
        _parsed("dfr_barlow", "train", "train#dataset#data", dataset_dir=str(root))
    err = e.value
    while err is not None and not isinstance(err, DataError):
        err = err.__cause__ or err.__context__
    assert err is not None and str(root) in str(err) and "expected at least one case with a label map" in str(err)


def _guide_commands() -> list[list[str]]:
    """The commands of docs/user_guide.md's "Your own data" section, comments dropped."""
    text = (REPO / "docs" / "user_guide.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_user_guide_own_data_commands_on_a_mostly_unlabelled_copy(brats_copy, medssl, data_log, tmp_path):
    """The guide's commands, verbatim but for the two paths and a tiny budget appended to each run."""
    root = brats_copy(12)
    lab, unl = _unlabel_brats(root, 5)  # 5 labelled: 2 test, 1 validation, 2 training; 7 unlabelled
    runs = tmp_path / "runs"
    commands = _guide_commands()
    assert [c[:3] for c in commands] == [["medssl", "data", "check"], ["medssl", "data", "split"],
                                         ["medssl", "run", "context_restoration"], ["medssl", "run", "context_restoration"],
                                         ["medssl", "run", "context_restoration"]]
    outputs = []
    for words in commands:
        words = [w.replace("/data/my_scans", str(root)).replace("runs/my_scans", str(runs)) for w in words]
        code, out, err = medssl(*words[1:], *(TINY if words[1] == "run" else []))
        assert code == 0, f"{' '.join(words)}: {err[-2000:]}"
        outputs.append(out)
    assert "OK, 12 cases (5 labelled, 7 without a label)" in outputs[0]
    split = _check_split(Path(str(root) + ".json"), lab, unl)
    n_train = len(split["training"])
    assert n_train == 9

    # pretraining ran on every training case (labelled or not), the supervised train on the labelled ones only
    assert (runs / "pretrained.pt").is_file() and (runs / "model.pt").is_file()
    common = {"dataset_dir": str(root), "datalist_file": str(root) + ".json"}
    assert _names(_parsed("context_restoration", "pretrain", "train#dataset#data", **common)) == _names(split["training"])
    n_lab = sum(c["labelled"] for c in split["training"])
    used = [m for m in data_log if "supervised training uses" in m]
    assert used and all(f"uses {n_lab} labelled case(s) of {n_train} training" in m for m in used)
    assert any("(2 labelled, 7 without a label)" in m for m in data_log)
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert all(c["case"] in text for c in split["test"]) and not any(u in text for u in unl)


def test_semi_cml_uses_the_unlabelled_cases_as_its_unlabelled_stream(brats_copy, medssl, data_log, tmp_path):
    root = brats_copy(9)
    lab, unl = _unlabel_brats(root, 5)
    common = {"dataset_dir": str(root)}
    stream = _parsed("semi_cml", "train", "train#unlabelled#data", **common)
    assert unl <= _names(stream) and all("label" not in c for c in stream)
    sup = _parsed("semi_cml", "train", "train#dataset#data", **common)
    assert _names(sup) <= lab and len(sup) == 1  # label_fraction 0.1 of the 2 labelled training cases
    assert unl <= _names(_parsed("semi_cml", "prel", "train#unlabelled#data", **common))
    code, out, err = medssl("run", "semi_cml", "train", "--dataset_dir", root, "--ckpt_dir", tmp_path / "semi", *TINY)
    assert code == 0, err[-2000:]
    assert (tmp_path / "semi" / "model.pt").is_file()
    assert any("(1 labelled, 4 without a label)" in m for m in data_log)


def test_no_label_at_all_is_refused_by_supervised_train_with_one_message(brats_copy, medssl, tmp_path):
    root = brats_copy(4)
    _unlabel_brats(root, 0)
    code, out, err = medssl("data", "check", root)
    assert code == 0 and "(0 labelled, 4 without a label)" in out
    code, out, err = medssl("data", "split", root, "--out", tmp_path / "none.json")
    none = json.loads((tmp_path / "none.json").read_text())
    assert code == 0 and not none["validation"] and not none["test"]
    assert len(none["training"]) == 4 and not any(c["labelled"] or "label" in c for c in none["training"])
    assert len(_parsed("context_restoration", "pretrain", "train#dataset#data", dataset_dir=str(root))) == 4
    code, out, err = medssl("run", "context_restoration", "train", "--dataset_dir", root, "--ckpt_dir", tmp_path / "m",
                            *TINY)
    assert code == 2
    # (stderr may also hold logging noise of earlier tests' closed capture streams: look for the message)
    lines = err.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("medssl run context_restoration train:")]
    assert len(heads) == 1, err
    head, problem = lines[heads[0]], lines[heads[0] + 1]
    assert head.endswith("DataError: 1 data problem(s):") and problem.startswith("  data set ")
    assert str(root) in problem and "no labelled case (4 training case(s)" in problem
    assert "expected at least one case with a segmentation <case>/<case>_seg.nii.gz" in problem
    assert not (tmp_path / "m" / "model.pt").exists()
    # evaluation too: one message, not "0 test case(s)" scored
    code, out, err = medssl("run", "context_restoration", "evaluate", "--dataset_dir", root, "--ckpt_dir", tmp_path / "m",
                            "--output_dir", tmp_path / "e")
    assert code == 2 and "no labelled case in 'test' (4 training case(s), 0 labelled); expected labelled cases to " \
                         "evaluate on" in err, err[-2000:]
    assert not (tmp_path / "e" / "metrics.json").exists()
