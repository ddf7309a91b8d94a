"""``medssl benchmark``: label-efficiency of a method against its baseline and other variants.

A bundle's benchmark (``bundles/<name>/benchmark.json``, read by :func:`load_spec`) is a set of named
*variants* (``method``, ``baseline`` and, where the issue asks, comparisons and ablations), each a set
of ``train`` overrides plus, optionally, the name of a *pretraining* (a set of ``pretrain`` overrides)
whose weights it starts from. The cases are cut into ``folds`` (k-fold cross-validation, one seed for
the assignment): for each fold, each pretraining once on that fold's training cases (labels unused,
never its test cases), then for each label fraction every variant fine-tuned on the same labelled cases
and evaluated on the fold's test cases, so over the folds every case is tested exactly once. Every
finished run is kept on disk (``out/fold{k}/f{fraction}/{variant}/run.json``), so an interrupted
benchmark resumes where it stopped. Variants are compared with ``baseline`` case by case (paired
bootstrap over all folds' test cases, :mod:`medssl.apps.stats`). Writes ``results.json``,
``results.md`` and ``label_efficiency.png`` to ``out``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundles import bundles_dir, run_stage
from ..data import LAYOUTS, check_cases, detect_layout, make_fold, write_datalist
from ..utils import atomic_write, atomic_write_json, atomic_write_text
from .stats import bootstrap_ci, paired_bootstrap, paired_differences


@dataclass
class Variant:
    """``train`` overrides of one compared run; ``pretrain`` names the pretraining it starts from.

    ``stage`` is the bundle stage that trains it (default ``train``; None: no training, only the
    evaluation - with the variant's overrides - of the continued variant's model); ``continues=(variant, id)`` makes
    it a second phase: it starts from the ``model.pt`` of that (earlier listed) variant's run at the same
    fraction and fold, passed as config id ``id`` (e.g. Semi-CML's PReL stage after contrastive mutual
    learning); its ``train_seconds`` include the first phase's."""

    train: dict = field(default_factory=dict)
    pretrain: str | None = None
    stage: str | None = "train"
    continues: tuple[str, str] | None = None
    notes: str = ""


@dataclass
class BenchmarkSpec:
    """A bundle's benchmark, as ``bundles/<name>/benchmark.json`` holds it."""

    dataset: str
    regions: Sequence[str]
    budgets: dict = field(default_factory=dict)  # budget -> {"pretrain": overrides, "train": overrides}
    variants: dict = field(default_factory=lambda: {"method": Variant({"init": "method"}, "method"),
                                                    "baseline": Variant({"init": "baseline"})})
    pretrainings: dict = field(default_factory=lambda: {"method": {}})  # name -> pretrain overrides
    # per data layout ("brats", "nuclei"): {"regions": [...], "overrides": {ids for every stage},
    # "split": {"val_fraction": v}, "folds": k}; a layout not listed uses ``regions``, ``folds`` and the defaults
    layouts: dict = field(default_factory=dict)
    # (variant, fraction): each run's Dice is also reported as a ratio to this reference's Dice on the
    # same fold and region (e.g. ("baseline", 1.0): full supervision, the upper bound)
    reference: tuple[str, float] | None = None
    folds: int = 5  # k of the k-fold cross-validation
    notes: str = ""

    def for_layout(self, layout: str) -> tuple[list[str], dict, dict, int]:
        """(regions, stage overrides, split keyword arguments, folds) for a data set of ``layout``."""
        entry = self.layouts.get(layout, {})
        return (list(entry.get("regions", self.regions)), dict(entry.get("overrides", {})),
                dict(entry.get("split", {})), int(entry.get("folds", self.folds)))

    @property
    def names(self) -> list[str]:
        """The variant names, in the spec's order."""
        return list(self.variants)

    def problems(self) -> list[str]:
        """What is inconsistent: a ``pretrain`` that names no pretraining, a ``continues`` that names no
        earlier variant."""
        out = []
        for i, (name, v) in enumerate(self.variants.items()):
            if v.pretrain is not None and v.pretrain not in self.pretrainings:
                out.append(f"variant {name!r}: pretrain {v.pretrain!r} is not among the pretrainings "
                           f"{sorted(self.pretrainings)}")
            if v.continues is not None and v.continues[0] not in list(self.variants)[:i]:
                out.append(f"variant {name!r}: continues {v.continues[0]!r}, which is not an earlier variant")
        return out


def load_spec(bundle: str) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` of ``bundle``, read from ``bundles/<bundle>/benchmark.json`` and checked."""
    path = _spec_file(bundle)
    if not path.is_file():
        raise ValueError(f"{path}: missing; no benchmark defined for {bundle!r}; expected one of {sorted(BENCHMARKS)}")
    raw = json.loads(path.read_text())
    variants = {name: Variant(dict(v.get("train", {})), v.get("pretrain"), v.get("stage", "train"),
                              tuple(v["continues"]) if v.get("continues") else None, v.get("notes", ""))
                for name, v in raw["variants"].items()}
    spec = BenchmarkSpec(dataset=raw["dataset"], regions=tuple(raw["regions"]), budgets=raw.get("budgets", {}),
                         variants=variants, pretrainings=raw.get("pretrainings", {}), layouts=raw.get("layouts", {}),
                         reference=tuple(raw["reference"]) if raw.get("reference") else None,
                         folds=int(raw.get("folds", 5)), notes=raw.get("notes", ""))
    problems = spec.problems()
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return spec


def _spec_file(bundle: str) -> Path:
    return bundles_dir() / bundle / "benchmark.json"


class _Specs(Mapping):
    """Read-only mapping: bundle name -> :class:`BenchmarkSpec`, for every bundle with a ``benchmark.json``
    (read when looked up, so an edited file is seen at once; membership reads no spec)."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and _spec_file(name).is_file()

    def __getitem__(self, name: str) -> BenchmarkSpec:
        if name not in self:
            raise KeyError(name)
        return load_spec(name)

    def __iter__(self):
        return iter(sorted(p.parent.name for p in bundles_dir().glob("*/benchmark.json")))

    def __len__(self) -> int:
        return sum(1 for _ in self)


BENCHMARKS = _Specs()


def _parse_list(values, cast):
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif not isinstance(values, (list, tuple)):
        values = [values]
    return [cast(v) for v in values]


def run_benchmark(bundle: str, data_dir: str, fractions="0.1,0.2,1.0", folds: int | None = None, seed: int = 0,
                  budget: str = "small", out: str = "benchmark_out", progress: bool = True,
                  logging_file: str | bool | None = None, variants=None, reevaluate: bool = False) -> dict:
    """Run (or resume) the benchmark grid (folds x fractions x variants); returns the ``results.json`` content.

    ``folds`` (default: the spec's, per data layout) and ``seed`` fix the cross-validation
    (:func:`medssl.data.make_fold`); an ``out`` already used with other folds or seed is refused.
    ``variants`` (comma-separated names; default all) limits which variants are trained now; runs of
    the other variants already finished under ``out`` (from an earlier call) are still reported, so
    a costly comparison can be run at fewer fractions than method and baseline into one ``out``.
    ``reevaluate`` runs the evaluation stage again on the finished runs of the selected variants
    (their trained models and training times are kept): for a changed evaluation, without retraining.
    """
    spec = load_spec(bundle)
    if budget not in spec.budgets:
        raise ValueError(f"budget must be one of {sorted(spec.budgets)}, got {budget!r}")
    fractions, seed = _parse_list(fractions, float), int(seed)
    selected = spec.names if variants is None else _parse_list(variants, str)
    unknown = sorted(set(selected) - set(spec.names))
    if unknown:
        raise ValueError(f"unknown variants {unknown} for {bundle!r}; expected some of {spec.names}")
    out_dir = Path(out).resolve()
    data_dir = str(Path(data_dir).resolve())
    layout = detect_layout(data_dir)
    cases = LAYOUTS[layout](data_dir)
    check_cases(cases, layout, context=f"data set {data_dir}")  # every problem, before any training
    regions, data_overrides, split_args, default_folds = spec.for_layout(layout)
    num_folds = int(folds or default_folds)
    val_fraction = float(split_args.get("val_fraction", 0.15))
    overrides = spec.budgets[budget]
    previous = out_dir / "results.json"  # an earlier call's peak memory (results.json is rewritten below)
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    if earlier and (earlier.get("folds"), earlier.get("seed")) != (num_folds, seed):
        raise ValueError(f"{out_dir}: holds a benchmark with folds={earlier.get('folds')}, seed={earlier.get('seed')}; "
                         f"expected folds={num_folds}, seed={seed} (or another --out)")
    results = {"bundle": bundle, "dataset": Path(data_dir).name, "data_dir": data_dir, "budget": budget,
               "fractions": fractions, "folds": num_folds, "seed": seed, "val_fraction": val_fraction,
               "regions": regions, "runs": []}

    from tqdm.auto import tqdm

    bar = tqdm(total=num_folds * (1 + len(fractions) * len(selected)), desc=f"benchmark {bundle}",
               disable=not progress)
    for fold in range(num_folds):
        fold_dir = out_dir / f"fold{fold}"
        datalists = {f: write_datalist(make_fold(cases, fold, num_folds, f, seed, val_fraction),
                                       fold_dir / f"datalist_f{f:g}.json", data_dir) for f in fractions}
        common = {"dataset_dir": data_dir, "seed": seed, **data_overrides}
        weights = {}
        for name in sorted({v.pretrain for v in spec.variants.values() if v.pretrain}):
            pre_dir = fold_dir / f"pretrain_{name}"
            weights[name] = pre_dir / "pretrained.pt"
            needed = any(spec.variants[v].pretrain == name for v in selected)
            if not weights[name].is_file() and not needed:
                continue
            if not weights[name].is_file():
                bar.set_postfix_str(f"fold {fold}: pretrain {name}")
                t0 = time.perf_counter()
                # the fold's training cases, labelled or not (the same at every fraction); never its test cases
                run_stage(bundle, "pretrain", logging_file, ckpt_dir=str(pre_dir),
                          datalist_file=str(datalists[max(fractions)]), **common,
                          **{**overrides["pretrain"], **spec.pretrainings[name]})
                atomic_write_json({"pretrain_seconds": time.perf_counter() - t0}, pre_dir / "timing.json")
            timing = json.loads((pre_dir / "timing.json").read_text())["pretrain_seconds"]
            results.setdefault("pretrain_seconds", {}).setdefault(name, {})[str(fold)] = round(timing, 1)
        bar.update(1)
        for f in fractions:
            for name, variant in spec.variants.items():
                run_dir = fold_dir / f"f{f:g}" / name
                record = run_dir / "run.json"

                def evaluate_and_record(ckpt_dir, train_seconds):  # called within this iteration only
                    # the budget's and the variant's overrides go to evaluation too (network sizes and
                    # switches must match; ids that evaluate.json does not use are inert there)
                    run_stage(bundle, "evaluate", logging_file, ckpt_dir=str(ckpt_dir), output_dir=str(run_dir),
                              datalist_file=str(datalists[f]), **common, **{**overrides["train"], **variant.train})
                    metrics = json.loads((run_dir / "metrics.json").read_text())
                    n_lab = sum(c.get("labelled", True) for c in json.loads(datalists[f].read_text())["training"])
                    atomic_write_json(run_record(metrics, variant=name, fraction=f, fold=fold, seed=seed,
                                                 labelled_cases=n_lab, train_seconds=round(train_seconds, 1)), record)
                if name not in selected:
                    if record.is_file():  # finished by an earlier call: still part of the comparison
                        results["runs"].append(json.loads(record.read_text()))
                    continue
                ckpt_dir = fold_dir / f"f{f:g}" / variant.continues[0] if variant.stage is None else run_dir
                if record.is_file() and reevaluate:  # the trained model stays; only its evaluation is redone
                    bar.set_postfix_str(f"fold {fold}, fraction {f:g}: re-evaluate {name}")
                    evaluate_and_record(ckpt_dir, json.loads(record.read_text())["train_seconds"])
                elif not record.is_file():
                    bar.set_postfix_str(f"fold {fold}, fraction {f:g}: {name}")
                    start = {"pretrained_ckpt": str(weights[variant.pretrain])} if variant.pretrain else {}
                    before = 0.0
                    if variant.continues:
                        first, key = variant.continues
                        first_run = json.loads((fold_dir / f"f{f:g}" / first / "run.json").read_text())
                        start[key] = str(fold_dir / f"f{f:g}" / first / "model.pt")
                        before = first_run["train_seconds"]
                    t0 = time.perf_counter()
                    if variant.stage is not None:  # None: evaluation only, of the continued variant's model
                        run_stage(bundle, variant.stage, logging_file, ckpt_dir=str(run_dir),
                                  datalist_file=str(datalists[f]), label_fraction=f, **common, **start,
                                  **{**overrides["train"], **variant.train})
                    evaluate_and_record(ckpt_dir, before + time.perf_counter() - t0)
                results["runs"].append(json.loads(record.read_text()))
                atomic_write_json(results, out_dir / "results.json")
                bar.update(1)
    bar.close()
    report(results, spec.names, spec.reference)
    # a resumed call that trains little must not report its own small footprint as the benchmark's
    results["peak_rss_mb"] = max(_peak_rss_mb(), earlier.get("peak_rss_mb") or 0.0)
    atomic_write_json(results, out_dir / "results.json")
    atomic_write_text(results_markdown(results), out_dir / "results.md")
    plot_label_efficiency(results, out_dir / "label_efficiency.png")
    return results


def report(results: dict, names: Sequence[str], reference: tuple[str, float] | None = None) -> dict:
    """Add to ``results`` (its ``runs``, ``fractions`` and ``regions``) the ``summary`` rows, the paired
    ``comparisons`` with ``baseline`` and, given a ``reference`` (variant, fraction), the
    ``ratio_to_reference`` rows; returns ``results``."""
    runs, fractions, regions = results["runs"], results["fractions"], results["regions"]
    results["summary"] = summarise(runs, fractions, names, regions)
    results["comparisons"] = compare(runs, fractions, names, regions)
    if reference:
        results["reference"] = {"variant": reference[0], "fraction": reference[1]}
        results["ratio_to_reference"] = ratios_to_reference(runs, *reference, regions)
    return results


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


RECORD_KEYS = ("variant", "fraction", "fold", "seed", "labelled_cases", "train_seconds")


def _is_number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def run_record(metrics: dict, **keys) -> dict:
    """One run's record: ``keys`` (:data:`RECORD_KEYS`), then every scalar (number, string, bool, null) and
    every ``{region: number}`` dict at the top level of its evaluation's ``metrics.json``, then its
    per-case values: ``cases`` (``{case: {region: Dice}}``) and ``<metric>_cases`` for each other per-case
    metric (e.g. ``hd95_cases``). A per-slice report (weak supervision) is keyed ``case/slice``."""
    record = dict(keys)
    for k, v in metrics.items():
        if k not in record and (v is None or isinstance(v, (int, float, str, bool))
                                or (isinstance(v, dict) and v and all(_is_number(x) for x in v.values()))):
            record[k] = v
    rows = metrics.get("per_case")
    if rows is None:  # per-slice rows hold one number per metric, for the report's one region
        region = next(iter(metrics.get("dice") or {"": None}))
        rows = [{"case": f"{r['case']}/{r['slice']}", **{m: {region: r[m]} for m in ("dice", "hd95") if m in r}}
                for r in metrics.get("per_slice", [])]
    for row in rows:
        for m, v in row.items():
            if isinstance(v, dict):
                record.setdefault("cases" if m == "dice" else f"{m}_cases", {})[str(row["case"])] = v
    record.setdefault("cases", {})
    return record


def pooled(runs: list[dict], key: str = "cases") -> dict:
    """The per-case values ``key`` of ``runs`` (one variant at one fraction) over all their folds:
    ``{"fold{k}/{case}": {region: value}}``."""
    return {f"fold{r['fold']}/{c}": v for r in runs for c, v in r.get(key, {}).items()}


def _region_values(per_case: dict, region: str, regions) -> dict:
    """``{case: value}`` of one region, or (``region="mean"``) of the mean over ``regions`` (None skipped)."""
    if region != "mean":
        return {c: v.get(region) for c, v in per_case.items()}
    return {c: _mean([v.get(g) for g in regions]) for c, v in per_case.items()}


def _mean(values, digits: int | None = None):
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    return (round(float(np.mean(v)), digits) if digits is not None else float(np.mean(v))) if v else None


def summarise(runs: list[dict], fractions, names, regions) -> list[dict]:
    """Per (fraction, variant): means over all test cases of all folds (``n_cases``), with the std over
    cases and a 95% bootstrap CI of the mean of the per-case mean Dice over regions; per-region Dice and
    HD95; and means over folds of training time, labelled cases and every other numeric metric the runs
    all report (``metrics``)."""
    rows = []
    for f in fractions:
        for name in names:
            sel = [r for r in runs if r["fraction"] == f and r["variant"] == name]
            if not sel:
                continue
            dice, hd95 = pooled(sel), pooled(sel, "hd95_cases")
            means = [v for v in _region_values(dice, "mean", regions).values() if v is not None]
            common = set.intersection(*(set(r) for r in sel)) - {*RECORD_KEYS, "mean_dice", "mean_hd95", "num_cases"}
            rows.append({
                "fraction": f, "variant": name, "n_folds": len(sel), "n_cases": len(dice),
                "mean_dice": _mean(means, 4), "std_dice": round(float(np.std(means)), 4) if means else None,
                "mean_dice_ci": bootstrap_ci(means)[1],
                "dice": {g: _mean(_region_values(dice, g, regions).values(), 4) for g in regions},
                "mean_hd95": _mean(_region_values(hd95, "mean", regions).values(), 2),
                "hd95": {g: _mean(_region_values(hd95, g, regions).values(), 2) for g in regions},
                "train_seconds": _mean([r["train_seconds"] for r in sel], 1),
                "labelled_cases": _mean([r["labelled_cases"] for r in sel], 1),
                "metrics": {k: _mean([r[k] for r in sel], 4) for k in sorted(common)
                            if all(_is_number(r[k]) and r[k] is not None for r in sel)},
            })
    return rows


def compare(runs: list[dict], fractions, names, regions, baseline: str = "baseline") -> list[dict]:
    """Per fraction, each variant against ``baseline`` on the same test cases of the folds both ran: the
    paired per-case Dice differences pooled over folds, per region and for the per-case mean over
    regions (``region="mean"``), through :func:`medssl.apps.stats.paired_bootstrap` (mean difference,
    95% CI, cases better / worse, verdict)."""
    rows = []
    for f in fractions:
        base = {r["fold"]: r for r in runs if r["fraction"] == f and r["variant"] == baseline}
        for name in names:
            sel = [r for r in runs if r["fraction"] == f and r["variant"] == name and r["fold"] in base]
            if name == baseline or not sel:
                continue
            mine, theirs = pooled(sel), pooled([base[r["fold"]] for r in sel])
            for region in ["mean", *regions]:
                d = paired_differences(_region_values(mine, region, regions), _region_values(theirs, region, regions))
                rows.append({"fraction": f, "variant": name, "baseline": baseline, "region": region,
                             "n_folds": len(sel), **paired_bootstrap(d)})
    return rows


def ratios_to_reference(runs: list[dict], ref_variant: str, ref_fraction: float, regions) -> list[dict]:
    """Per (fraction, variant): mean (± std) over folds of Dice / the reference run's Dice on the same
    fold, per region."""
    ref = {r["fold"]: r for r in runs if r["variant"] == ref_variant and r["fraction"] == ref_fraction}
    groups: dict = {}
    for r in runs:
        if r["fold"] in ref:
            groups.setdefault((r["fraction"], r["variant"]), []).append(r)
    rows = []
    for (f, name), sel in sorted(groups.items(), key=lambda kv: kv[0][0]):
        row = {"fraction": f, "variant": name, "n_folds": len(sel)}
        for g in regions:
            v = [r["dice"][g] / ref[r["fold"]]["dice"][g] for r in sel
                 if r["dice"].get(g) is not None and (ref[r["fold"]]["dice"].get(g) or 0) > 0]
            row[g] = {"ratio": _mean(v, 4), "std": round(float(np.std(v)), 4) if v else None}
        rows.append(row)
    return rows


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def results_markdown(results: dict) -> str:
    """``results.md``: the summary table, the paired comparison table and, where the spec names a
    reference, the ratios to it."""
    rows, regions = results["summary"], results["regions"]
    lines = [f"# {results['bundle']} on {results['dataset']} (budget: {results['budget']}, "
             f"{results['folds']}-fold cross-validation, seed {results['seed']})", "",
             "Test-set Dice over all test cases of all folds (every case is tested once): mean ± std over cases "
             "and a 95% bootstrap CI of the mean; HD95 in voxels/pixels; labelled cases and train s: means over "
             "folds. `method` = the bundle's method, `baseline` = its baseline; other rows are the comparisons "
             "and ablations named in the bundle's docs.", ""]
    extra = sorted(set.intersection(*(set(r["metrics"]) for r in rows))) if rows else []
    hd_regions = list(regions) if len(regions) > 1 else []
    lines += ["| fraction | labelled cases | variant | cases | mean Dice | 95% CI | "
              + "".join(f"{g} Dice | " for g in regions) + "".join(f"{k} | " for k in extra) + "mean HD95 | "
              + "".join(f"{g} HD95 | " for g in hd_regions) + "train s |",
              "|" + "---|" * (8 + len(regions) + len(extra) + len(hd_regions))]
    for r in rows:
        ci = r["mean_dice_ci"]
        lines.append(f"| {r['fraction']:g} | {_fmt(r['labelled_cases'], 'g')} | {r['variant']} | {r['n_cases']} | "
                     f"{_fmt(r['mean_dice'])} ± {_fmt(r['std_dice'])} | [{_fmt(ci[0])}, {_fmt(ci[1])}] | "
                     + "".join(f"{_fmt(r['dice'][g])} | " for g in regions)
                     + "".join(f"{_fmt(r['metrics'][k], '.4g')} | " for k in extra)
                     + f"{_fmt(r['mean_hd95'], '.1f')} | "
                     + "".join(f"{_fmt(r['hd95'][g], '.1f')} | " for g in hd_regions)
                     + f"{_fmt(r['train_seconds'], '.0f')} |")
    if results.get("comparisons"):
        lines += ["", "Paired comparison with `baseline` on the same test cases (Dice of the variant minus the "
                  "baseline's, per case, pooled over folds; `mean` = the per-case mean over regions; 95% bootstrap "
                  "CI over cases; better/worse: the verdict where the CI excludes 0):", "",
                  "| fraction | variant | region | mean Δ Dice | 95% CI | better/worse cases | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["comparisons"]:
            lines.append(f"| {c['fraction']:g} | {c['variant']} | {c['region']} | {_fmt(c['mean'], '+.3f')} | "
                         f"[{_fmt(c['ci'][0], '+.3f')}, {_fmt(c['ci'][1], '+.3f')}] | {c['better']}/{c['worse']} | "
                         f"{c['verdict']} |")
    if results.get("ratio_to_reference"):
        ref = results["reference"]
        lines += ["", f"Dice as a fraction of `{ref['variant']}` at fraction {ref['fraction']:g} (same fold; "
                  "mean ± std over folds):", "", "| fraction | variant | " + " | ".join(regions) + " |",
                  "|" + "---|" * (2 + len(regions))]
        for r in results["ratio_to_reference"]:
            lines.append(f"| {r['fraction']:g} | {r['variant']} | "
                         + " | ".join(f"{_fmt(r[g]['ratio'])} ± {_fmt(r[g]['std'])}" for g in regions) + " |")
    return "\n".join(lines) + "\n"


def plot_label_efficiency(results: dict, path: Path) -> None:
    """Mean test Dice against label fraction, one line per variant, with the 95% bootstrap CI of the mean
    over cases as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name in dict.fromkeys(r["variant"] for r in results["summary"]):
        rows = sorted((r for r in results["summary"] if r["variant"] == name and r["mean_dice"] is not None),
                      key=lambda r: r["fraction"])
        if not rows:
            continue
        m = np.array([r["mean_dice"] for r in rows])
        ci = np.array([[m_ if c is None else c for c in r["mean_dice_ci"]] for m_, r in zip(m, rows)], dtype=float)
        ax.errorbar([r["fraction"] for r in rows], m, yerr=[m - ci[:, 0], ci[:, 1] - m], marker="o", capsize=3,
                    label=name)
    ax.set_xscale("log")
    ax.set_xticks(results["fractions"], [f"{f:g}" for f in results["fractions"]])
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("mean test Dice (95% CI over cases)")
    ax.set_title(f"{results['bundle']} on {results['dataset']} ({results['budget']} budget, "
                 f"{results['folds']} folds)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
