"""The benchmark's score of the network a bundle serves, where a run trains several and serves one.

A bundle whose runs evaluate several networks (semi_cml: one per modality, each a ``region`` of its
``metrics.json``) but whose ``inference.json`` serves one of them - chosen during training (PReL's student,
the weaker modality on validation) - names in its ``benchmark.json``::

    "inference_region": {"name": "inference", "variant": "method", "file": "prel_choice.json", "key": "student",
                         "notes": "..."}

For each (fold, fraction), ``file`` in the run folder of ``variant`` says, under ``key``, which region (network)
that fold serves. Every run of that fold and fraction - whatever its variant - then gets a region ``name`` whose
per-case values are that network's, so the paired comparisons score every variant on the modality the method
serves in that fold (the same cases, the same network role). The mean over the spec's own regions is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

PER_CASE = ("cases", "hd95_cases")


def served_regions(entry: Mapping, out_dir: Path, folds, fractions) -> dict[tuple[int, float], str]:
    """``{(fold, fraction): region}`` read from each fold's ``entry["file"]`` in ``entry["variant"]``'s run folder;
    cells without the file (e.g. a fraction where the stage had nothing to choose) are left out. A file without
    ``entry["key"]`` raises ``ValueError`` naming it."""
    out = {}
    for fold in folds:
        for f in fractions:
            path = Path(out_dir) / f"fold{fold}" / f"f{f:g}" / entry["variant"] / entry["file"]
            if not path.is_file():
                continue
            choice = json.loads(path.read_text())
            if entry["key"] not in choice:
                raise ValueError(f"{path}: no {entry['key']!r}; expected the choice the training stage writes "
                                 f"(keys {sorted(choice)})")
            out[(int(fold), float(f))] = str(choice[entry["key"]])
    return out


def add_served_region(runs: list[dict], entry: Mapping, served: Mapping[tuple[int, float], str]) -> list[str]:
    """Give every run record of a cell in ``served`` the region ``entry["name"]``: its per-case Dice and HD95 and its
    mean Dice, copied from the served region's, and ``served_region`` naming it. Returns ``[name]`` where any run
    got it (the regions to report beside the spec's), else ``[]``."""
    name, added = entry["name"], False
    for r in runs:
        region = served.get((int(r["fold"]), float(r["fraction"])))
        if region is None:
            continue
        for key in PER_CASE:
            for values in r.get(key, {}).values():
                if region not in values:
                    raise ValueError(f"run {r['variant']} (fold {r['fold']}, fraction {r['fraction']:g}): no region "
                                     f"{region!r} in its per-case {key}; expected one of {sorted(values)}")
                values[name] = values[region]
        if isinstance(r.get("dice"), dict) and region in r["dice"]:
            r["dice"][name] = r["dice"][region]
        r["served_region"], added = region, True
    return [name] if added else []
