"""The benchmark's view of pretext health (:mod:`medssl.engines.pretext_health`): collect each pretraining's
``pretext_health.json``, label the verdicts of variants whose pretraining did not beat its trivial solution
("pretext not learned"), and report it as a table and a figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

HEALTH_FILE = "pretext_health.json"
NOT_LEARNED = "pretext not learned"


def read_health(pre_dir: Path) -> dict | None:
    """A pretraining folder's ``pretext_health.json`` (written by the pretrain stage), or None where absent."""
    path = Path(pre_dir) / HEALTH_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable pretext health ({e}); expected the JSON the pretrain stage writes") from None


def unlearned(results: Mapping) -> dict[str, list[str]]:
    """{pretraining: [folds whose health check says not learned]} for those with any such fold (a fold with no
    measure, or a skipped one, counts as not shown to be learned)."""
    out = {}
    for name, folds in results.get("pretext_health", {}).items():
        bad = [fold for fold, h in sorted(folds.items()) if not (h or {}).get("learned", False)]
        if bad:
            out[name] = bad
    return out


def label_verdicts(results: dict, pretrain_of: Mapping[str, str | None]) -> None:
    """In ``results["comparisons"]``, a row one of whose two variants starts from a pretraining that did not
    beat its trivial solution in some fold gets the verdict :data:`NOT_LEARNED` (its statistical verdict kept
    as ``statistical_verdict``, the pretrainings as ``pretext_not_learned``). Pretrainings with no health
    record at all (runs from before the check) are left as they are."""
    bad = unlearned(results)
    for row in results.get("comparisons", []):
        used = sorted({pretrain_of.get(row["variant"]), pretrain_of.get(row["baseline"])} & set(bad))
        if used:
            row.setdefault("statistical_verdict", row["verdict"])
            row["verdict"], row["pretext_not_learned"] = NOT_LEARNED, used


def health_markdown(results: Mapping) -> list[str]:
    """The ``results.md`` lines of the pretext-health table (none without health records)."""
    health = results.get("pretext_health")
    if not health:
        return []
    lines = ["", "Pretext health: each pretraining's pretext metric on held-out crops of its fold's validation cases "
             "beside the trivial solution's (restoration: the corrupted input returned unchanged; classification: "
             "chance, and a per-block intensity-histogram probe); a verdict that rests on a pretraining that did not "
             f"beat it reads `{NOT_LEARNED}`:", "",
             "| pretraining | fold | metric | network | trivial (rule) | ratio | probe | on corrupted voxels "
             "(network / trivial) | learned |", "|---|---|---|---|---|---|---|---|---|"]
    for name, folds in health.items():
        for fold, h in sorted(folds.items()):
            if not h or "skipped" in h:
                lines.append(f"| {name} | {fold} | - | - | - | - | - | - | no ({(h or {}).get('skipped', 'not measured')}) |")
                continue
            ratio = h["value"] / h["trivial"] if h.get("trivial") else float("nan")
            corrupted = (f"{h['corrupted_value']:.4g} / {h['corrupted_trivial']:.4g}"
                         if "corrupted_value" in h else "-")
            probe = f"{h['probe']:.3f}" if "probe" in h else "-"
            lines.append(f"| {name} | {fold} | {h['metric']} | {h['value']:.4g} | {h['trivial']:.4g} "
                         f"({h['trivial_rule']}) | {ratio:.3f} | {probe} | {corrupted} | "
                         f"{'yes' if h.get('learned') else 'no'} |")
    return lines


def plot_health(ax, name: str, folds: Mapping) -> None:
    """One panel: per fold, the network's pretext metric beside the trivial solution's (and the probe's)."""
    rows = [(int(f), h) for f, h in sorted(folds.items()) if h and "value" in h]
    if not rows:
        return
    x = [f for f, _ in rows]
    ax.plot(x, [h["value"] for _, h in rows], "o", label="network")
    ax.plot(x, [h["trivial"] for _, h in rows], "s", mfc="none", label=rows[0][1]["trivial_rule"])
    if all("probe" in h for _, h in rows):
        ax.plot(x, [h["probe"] for _, h in rows], "^", mfc="none", label="histogram probe")
    ax.set_xticks(x)
    ax.set_xlabel("fold")
    ax.set_title(f"pretraining {name!r}: held-out {rows[0][1]['metric']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
