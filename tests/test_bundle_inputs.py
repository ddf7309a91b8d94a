"""Every stage of the bundle validates its data while its config is parsed, before any training:
bad input surfaces as the medssl error (naming the file) behind MONAI's config-evaluation error."""

import json

import pytest

from monai.bundle import ConfigParser

from medssl.data import DataError, brats_cases, make_split, write_datalist

from conftest import DAMAGES, REPO
from medssl.bundles import stage_config_files

BUNDLE = REPO / "bundles" / "context_restoration"


def _cause(e):
    while e is not None and not isinstance(e, DataError):
        e = e.__cause__ or e.__context__
    return e


@pytest.mark.parametrize("stage,item", [("train", "train#dataset#data"), ("pretrain", "train#dataset#data"),
                                        ("evaluate", "validate#dataset#data")])
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_stage_refuses_bad_cases(brats_copy, stage, item, damage):
    root = brats_copy(6)
    bad, expectation = damage(root)
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(BUNDLE, stage)])
    parser.update({"dataset_dir": str(root)})
    with pytest.raises(Exception) as e:
        parser.get_parsed_content(item)
    err = _cause(e.value)
    assert err is not None, f"no DataError behind {e.value!r}"
    assert str(bad) in str(err) and expectation in str(err)


def test_empty_dir_and_datalist_naming_missing_file(tmp_path, brats_dir):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"dataset_dir": str(tmp_path)})
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("datalist")
    assert "no cases found" in str(_cause(e.value))

    split = make_split(brats_cases(brats_dir), 0.5, seed=0)
    split["validation"][0]["label"] = str(brats_dir / "Gone_1" / "Gone_1_seg.nii.gz")
    dl = write_datalist(split, tmp_path / "datalist.json", brats_dir)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"dataset_dir": str(brats_dir), "datalist_file": str(dl)})
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("datalist")
    err = _cause(e.value)
    assert "Gone_1_seg.nii.gz: missing" in str(err) and str(dl) in str(err)
    assert json.loads(dl.read_text())["validation"][0]["label"].endswith("Gone_1_seg.nii.gz")
