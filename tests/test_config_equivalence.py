"""The layered, thinner bundle configs (issue 11) resolve to what the standalone configs resolved to:
for every bundle, every stage and every benchmark variant, the engines that ``run`` starts - network,
loss, optimiser, scheduler, data loaders, datasets, transforms, inferers, attached handlers - are
described by class and settings and compared with the description recorded from the configs before the
change (tests/data/config_fingerprints.json.gz, written by tests/config_fingerprint.py)."""

import gzip
import json

import pytest

from config_fingerprint import FINGERPRINTS, describe_all


def _diff(a, b, path=""):
    if type(a) is not type(b):
        return [f"{path}: {str(a)[:120]} != {str(b)[:120]}"]
    if isinstance(a, dict):
        out = [f"{path}/{k}: only {'before' if k in a else 'now'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items before, {len(b)} now"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} before, {b!r} now"]


@pytest.fixture(scope="module")
def recorded():
    with gzip.open(FINGERPRINTS, "rt") as f:
        return json.load(f)["stages"]


def test_every_stage_resolves_as_before(recorded, brats_dir, nuclei_dir):
    now = describe_all(str(brats_dir.parent))
    assert sorted(now) == sorted(recorded), "the set of stages and benchmark variants changed"
    diffs = [d for key in sorted(recorded) for d in _diff(recorded[key], now[key], key)]
    assert not diffs, f"{len(diffs)} differences, e.g.:\n" + "\n".join(diffs[:25])
