"""``medssl benchmark``: label-efficiency of a method against its baseline and other variants.

A bundle's benchmark (``bundles/<name>/benchmark.json``, read by :func:`load_spec`) is a set of named
*variants* (``method``, ``baseline`` and, where the issue asks, comparisons and ablations), each a set
of ``train`` overrides plus, optionally, the name of a *pretraining* (a set of ``pretrain`` overrides)
whose weights it starts from. The cases are cut into ``folds`` (k-fold cross-validation, one seed for
the assignment): for each fold, each pretraining once on that fold's training cases (labels unused,
never its test cases), then for each label fraction every variant fine-tuned on the same labelled cases
and evaluated on the fold's test cases, so over the folds every case is tested exactly once. Every
finished run is kept on disk (``out/fold{k}/f{fraction}/{variant}/result.json``), so an interrupted
benchmark resumes where it stopped. Variants are compared with ``baseline`` case by case (paired
bootstrap over all folds' test cases, :mod:`medssl.apps.stats`). Writes ``results.json``,
``results.md`` and ``label_efficiency.png`` to ``out``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundles import bundles_dir, run_stage
from ..data import LAYOUTS, check_cases, detect_layout, label_slices, make_fold, write_datalist
from ..utils import atomic_write, atomic_write_json, atomic_write_text
from .stats import bootstrap_ci, paired_bootstrap, paired_differences
from .inference_region import add_served_region, served_regions
from .pretext_report import health_markdown, label_verdicts, plot_health, read_health


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
    # name -> {"variant", "fraction", "fold", "steps": [pretraining lengths]}: see :func:`run_sweep`; or
    # {"variant", "fraction", "fold", "override": config id, "values": [...], ...}: see :func:`run_override_sweep`
    sweeps: dict = field(default_factory=dict)
    # name -> {"variant", "against", "notes"}: a paired comparison of two variants other than with
    # ``baseline`` (e.g. a method against its equal-step control), reported with the baseline comparisons
    pairs: dict = field(default_factory=dict)
    # {"name", "variant", "file", "key", "notes"}: the region scoring the network the bundle serves, where a run
    # trains several (:mod:`medssl.apps.inference_region`)
    inference_region: dict = field(default_factory=dict)
    verdict_on: str = ""  # one line: which network or map the verdicts are about (results.md, above the tables)
    # training-loss terms (iteration output keys, e.g. "pseudo_loss") whose curves each run keeps, drawn in loss_terms.png
    curves: Sequence[str] = ()

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
        for name, pair in self.pairs.items():
            unknown = [pair.get(k) for k in ("variant", "against") if pair.get(k) not in self.variants]
            if unknown:
                out.append(f"pair {name!r}: {unknown} not among the variants {list(self.variants)}")
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
                         folds=int(raw.get("folds", 5)), notes=raw.get("notes", ""), sweeps=raw.get("sweeps", {}),
                         pairs=raw.get("pairs", {}), inference_region=raw.get("inference_region", {}),
                         verdict_on=raw.get("verdict_on", ""), curves=tuple(raw.get("curves", ())))
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


@dataclass
class Run:
    """One entry of a benchmark's plan: a pretraining (``kind="pretrain"``) or a variant's fine-tuning and
    evaluation (``kind="variant"``) on one fold (and fraction). ``dir`` holds its files; it is finished
    when its record (``timing.json`` / ``result.json``) is there."""

    kind: str
    fold: int
    name: str
    dir: Path
    datalist: Path
    fraction: float | None = None
    overrides: dict = field(default_factory=dict)  # the stage's overrides (budget, variant / pretraining)
    pretrained: Path | None = None  # a variant's starting weights (its pretraining's pretrained.pt)
    selected: bool = True  # trained now (else only reported, where an earlier call finished it)

    @property
    def record(self) -> Path:
        if self.kind == "pretrain":
            return self.dir / "timing.json"
        path, legacy = self.dir / "result.json", self.dir / "run.json"
        # harnesses before the training stages wrote their own run.json (the run's settings) kept the
        # evaluation record under that name: adopt it once
        if not path.is_file() and legacy.is_file() and "variant" in json.loads(legacy.read_text()):
            os.replace(legacy, path)
        return path

    @property
    def label(self) -> str:
        return f"fold {self.fold}: pretrain {self.name}" if self.kind == "pretrain" else \
            f"fold {self.fold}, fraction {self.fraction:g}: {self.name}"


@dataclass
class Context:
    """What every run of one benchmark shares: the bundle, its spec, the common overrides and the
    results being collected."""

    bundle: str
    spec: BenchmarkSpec
    common: dict
    seed: int
    logging_file: str | bool | None
    results: dict
    figures: int = 0  # save_figures of the evaluations of FIGURE_VARIANTS (0: none)


FIGURE_VARIANTS = ("method", "baseline")  # drawn side by side by --figures, method on top


def plan(spec: BenchmarkSpec, cases, out_dir: Path, fractions, num_folds: int, seed: int, val_fraction: float,
         budget: str, selected, data_dir: str, label_unit: str = "case") -> list[Run]:
    """The benchmark's runs in execution order: per fold, the pretrainings the ``selected`` variants need,
    then per fraction every variant in the spec's order (so a ``continues`` variant comes after the one it
    continues; unselected ones are only reported, where an earlier call finished them). Writes each
    fold's datalists (the cross-validation split; nested labelled subsets). ``label_unit`` ``"slice"`` (a
    layout's ``split``, for 2D networks on slices of 3D volumes): a fraction labels that fraction of the axial
    slices of all the fold's training volumes (:func:`medssl.data.label_slices`) instead of whole volumes."""
    if label_unit not in ("case", "slice"):
        raise ValueError(f"label_unit must be 'case' or 'slice', got {label_unit!r}")
    overrides = spec.budgets[budget]
    runs = []
    for fold in range(num_folds):
        fold_dir = out_dir / f"fold{fold}"
        folded = {f: make_fold(cases, fold, num_folds, f, seed, val_fraction) for f in fractions}
        if label_unit == "slice":
            folded = {f: label_slices(dl, f) for f, dl in folded.items()}
        datalists = {f: write_datalist(dl, fold_dir / f"datalist_f{f:g}.json", data_dir) for f, dl in folded.items()}
        needed = {spec.variants[v].pretrain for v in selected}
        for name in sorted(n for n in spec.pretrainings if n in needed or (fold_dir / f"pretrain_{n}").is_dir()):
            # the fold's training cases, labelled or not (the same at every fraction); never its test cases
            runs.append(Run("pretrain", fold, name, fold_dir / f"pretrain_{name}", datalists[max(fractions)],
                            overrides={**overrides["pretrain"], **spec.pretrainings[name]}, selected=name in needed))
        for f in fractions:
            for name in spec.names:
                v = spec.variants[name]
                runs.append(Run("variant", fold, name, fold_dir / f"f{f:g}" / name, datalists[f], f,
                                {**overrides["train"], **v.train},
                                fold_dir / f"pretrain_{v.pretrain}" / "pretrained.pt" if v.pretrain else None,
                                name in selected))
    return runs


def execute(run: Run, ctx: Context, reevaluate: bool = False, step: int | None = None) -> dict | None:
    """Do ``run`` unless it is finished (a variant with ``reevaluate``: only its evaluation again) and return
    its record, or None for an unselected run that no earlier call finished. A variant is trained
    (:func:`train_run`), then evaluated with its kept model - the best validation's ``model.pt``, or with
    ``step`` the snapshot ``model_step{step}.pt`` (a training length chosen by :func:`select_steps`)."""
    if run.record.is_file() and not (reevaluate and run.kind == "variant" and run.selected):
        return json.loads(run.record.read_text())
    if not run.selected and not run.record.is_file():
        return None
    if run.kind == "pretrain":
        # an unfinished pretraining resumes from its last epoch, exactly (as train_run); its time counts the rest
        t0 = time.perf_counter()
        run_stage(ctx.bundle, "pretrain", ctx.logging_file, ckpt_dir=str(run.dir), datalist_file=str(run.datalist),
                  **ctx.common, **run.overrides)
        record = {"pretrain_seconds": round(time.perf_counter() - t0, 1), **pretext_curve(run.dir)}
        atomic_write_json(record, run.record)
        return record
    trained = train_run(run, ctx)
    ckpt_dir = _model_dir(run, ctx.spec.variants[run.name])
    ckpt = {} if step is None else {"ckpt_path": str(ckpt_dir / f"model_step{step}.pt")}
    # the budget's and the variant's overrides go to evaluation too (network sizes and switches must
    # match; ids that evaluate.json does not use are inert there)
    figures = {"save_figures": ctx.figures} if ctx.figures and run.name in FIGURE_VARIANTS else {}
    run_stage(ctx.bundle, "evaluate", ctx.logging_file, ckpt_dir=str(ckpt_dir), output_dir=str(run.dir),
              datalist_file=str(run.datalist), **ctx.common, **run.overrides, **ckpt, **figures)
    metrics = json.loads((run.dir / "metrics.json").read_text())
    training = json.loads(run.datalist.read_text())["training"]
    n_lab = sum(c.get("labelled", True) for c in training)
    # a slice-level budget (label_unit "slice"): labelled_cases counts the volumes with a labelled slice
    n_slices = {"labelled_slices": sum(len(c["labelled_slices"]) for c in training if "labelled_slices" in c)} \
        if any("labelled_slices" in c for c in training) else {}
    record = run_record(metrics, variant=run.name, fraction=run.fraction, fold=run.fold, seed=ctx.seed,
                        labelled_cases=n_lab, **n_slices, **trained, **({} if step is None else {"selected_step": step}))
    atomic_write_json(record, run.record)
    return record


def adopt_pretrainings(runs: list[Run], ctx: Context, out_dir: Path, source: Path) -> list[Path]:
    """Copy into ``out_dir`` the finished pretrainings of another benchmark folder ``source`` that this plan's
    unfinished pretrainings would repeat: same bundle, the same settings given to the pretrain stage (the
    budget's and the pretraining's overrides, seed and data; places aside) and the same datalist content (the
    fold's cases). Each copy is made in a temporary folder renamed at the end. A pretraining ``source`` lacks
    (or has not finished) is pretrained here as usual; one that differs in a setting, or a half-done one here,
    raises ``ValueError`` naming the file and the difference, before any training. Returns the copied folders."""
    import shutil
    import tempfile

    from ..bundles import _PLACE, RUN_RECORD, read_run_record

    def settings(given: dict) -> dict:  # what the stage was given, less where things are (the datalist: below)
        return {k: v for k, v in json.loads(json.dumps(given, default=str)).items()
                if k not in _PLACE and k != "datalist_file"}

    source = Path(source).resolve()
    if not source.is_dir():
        raise ValueError(f"{source}: no such benchmark folder (--pretrained_from); expected the --out of an earlier "
                         f"medssl benchmark {ctx.bundle}")
    todo = []
    for run in runs:
        if run.kind != "pretrain" or not run.selected or run.record.is_file():
            continue
        src = source / run.dir.relative_to(out_dir)
        if not (src / "timing.json").is_file():
            continue
        record_file, record = src / RUN_RECORD, read_run_record(src)
        ours, theirs = settings({**ctx.common, **run.overrides}), settings(record.get("overrides", {}))
        if record.get("bundle") != ctx.bundle or record.get("stage") != "pretrain" or theirs != ours:
            diff = {k: (theirs.get(k), ours.get(k)) for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)}
            raise ValueError(f"{record_file}: pretraining of bundle {record.get('bundle')!r}, stage "
                             f"{record.get('stage')!r} with other settings (there, here): {diff}; expected "
                             f"{ctx.bundle!r} pretrain with this budget's settings")
        their_list = Path(record.get("overrides", {}).get("datalist_file", ""))
        if not their_list.is_file() or json.loads(their_list.read_text()) != json.loads(run.datalist.read_text()):
            raise ValueError(f"{their_list}: the datalist {src} was pretrained on is missing or holds other cases "
                             f"than {run.datalist}; expected the same fold (same data, folds and seed)")
        if run.dir.exists():
            raise ValueError(f"{run.dir}: an unfinished pretraining; expected none where --pretrained_from "
                             f"{source} provides it (remove the folder to adopt it)")
        todo.append((src, run.dir))
    for src, dst in todo:  # every check passed before anything is copied
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.replace(tmp, dst)
    return [dst for _, dst in todo]


def _model_dir(run: Run, variant: Variant) -> Path:
    """Where a variant run's model and curves are: its own folder, or (an evaluation-only variant) the
    folder of the run it continues."""
    return run.dir.parent / variant.continues[0] if variant.stage is None else run.dir


def train_run(run: Run, ctx: Context, start_step: int | None = None) -> dict:
    """Train a variant's run unless its ``trained.json`` is there; returns that record (training seconds
    and :func:`training_curve`). A variant that ``continues`` another starts from that run's ``model.pt``, or with
    ``start_step`` from its snapshot ``model_step{start_step}.pt`` (the model it is scored with, where the
    budget selects the training length on validation); ``continued_from`` records which. An unfinished training (cut off midway) resumes from its last epoch's
    checkpoint: a resumed training ends exactly where an uninterrupted one does
    (:class:`medssl.engines.ResumableCheckpoint`), so the numbers stay reproducible; its time counts the
    resumed part only."""
    done = run.dir / "trained.json"
    if done.is_file():
        return json.loads(done.read_text())
    variant = ctx.spec.variants[run.name]
    if run.record.is_file():  # evaluated by a harness that wrote no trained.json: never train it again
        return {"train_seconds": json.loads(run.record.read_text())["train_seconds"],
                **training_curve(_model_dir(run, variant))}
    start = {"pretrained_ckpt": str(run.pretrained)} if run.pretrained else {}
    before = 0.0
    if variant.continues:
        first, key = variant.continues
        start[key] = str(run.dir.parent / first / ("model.pt" if start_step is None else f"model_step{start_step}.pt"))
        before = json.loads((run.dir.parent / first / "trained.json").read_text())["train_seconds"]
    t0 = time.perf_counter()
    if variant.stage is not None:  # None: evaluation only, of the continued variant's model
        run_stage(ctx.bundle, variant.stage, ctx.logging_file, ckpt_dir=str(run.dir), datalist_file=str(run.datalist),
                  label_fraction=run.fraction, **ctx.common, **start, **run.overrides)
    record = {"train_seconds": round(before + time.perf_counter() - t0, 1),
              **training_curve(_model_dir(run, variant), ctx.spec.curves),
              **({"continued_from": Path(start[variant.continues[1]]).name}
                 if variant.continues and variant.stage is not None else {})}
    atomic_write_json(record, done)
    return record


def select_steps(trained: dict, steps) -> dict:
    """The training length of each (fraction, variant), chosen by validation pooled over its folds: for each
    candidate step (``steps``, the snapshots of every fold's run), the mean over folds of the validation
    mean Dice logged at that step; the best (the shorter on a tie). ``trained``: {(fraction, variant):
    [trained records of its folds]}. Returns {(fraction, variant): {"step", "validation": {step: mean}}}."""
    out = {}
    for key, records in trained.items():
        curves = [dict((int(i), v) for i, v in r.get("val_curve", [])) for r in records]
        pooled = {int(s): _mean([c.get(int(s)) for c in curves], 4) for s in steps
                  if all(c.get(int(s)) is not None for c in curves)}
        if not pooled:
            raise ValueError(f"{key}: no validation logged at any of the snapshot steps {list(steps)}")
        best = max(pooled.values())
        out[key] = {"step": min(s for s, v in pooled.items() if v == best), "validation": pooled}
    return out


def _block_means(points) -> list:
    """``[[iteration, value], ...]`` of every iteration -> about 100 points: the mean of each block of
    ``len(points) // 100`` iterations, at its last iteration; None values are skipped."""
    if not points:
        return []
    n = max(1, len(points) // 100)
    out, block = [], []
    for i, v in points:
        if v is not None:
            block.append(v)
        if i % n == 0 and block:
            out.append([i, round(float(np.mean(block)), 5)])
            block = []
    return out


def training_curve(ckpt_dir: Path, terms: Sequence[str] = ()) -> dict:
    """From a training's ``train_curve.json`` (:class:`medssl.engines.CurveLog`): its validation curve
    (``val_curve``: [[step, val_mean_dice], ...]), its loss in about 100 points (``loss_curve``), the step of the best
    validation (``best_step``, the model kept) and the last step trained (``steps``: less than the budget
    where early stopping ended it) and, for each of ``terms`` the run logged, ``<term>_curve`` (about 100 points).
    Empty where the bundle writes no curve."""
    path = Path(ckpt_dir) / "train_curve.json"
    if not path.is_file():
        return {}
    curve = json.loads(path.read_text())
    val = curve["metrics"].get("val_mean_dice", [])
    scored = [p for p in val if p[1] is not None]
    return {"steps": curve["loss"][-1][0] if curve["loss"] else 0, "val_curve": val,
            "best_step": max(scored, key=lambda p: p[1])[0] if scored else None,
            "loss_curve": _block_means(curve["loss"]),
            **{f"{t}_curve": _block_means(curve["metrics"][f"train_{t}"]) for t in terms
               if f"train_{t}" in curve["metrics"]}}


def pretext_curve(pre_dir: Path) -> dict:
    """A pretraining's pretext-loss curve (about 100 points) and its other logged terms, from
    ``pretrain_curve.json``; empty where the bundle writes none."""
    path = Path(pre_dir) / "pretrain_curve.json"
    if not path.is_file():
        return {}
    curve = json.loads(path.read_text())
    return {"steps": curve["loss"][-1][0] if curve["loss"] else 0, "loss_curve": _block_means(curve["loss"]),
            **{f"{k}_curve": _block_means(v) for k, v in curve["metrics"].items() if k.startswith("train_")}}


def run_benchmark(bundle: str, data_dir: str, fractions="0.1,0.2,1.0", folds: int | None = None, seed: int = 0,
                  budget: str = "small", out: str = "benchmark_out", progress: bool = True,
                  logging_file: str | bool | None = None, variants=None, reevaluate: bool = False,
                  workers: int = 1, figures: int = 0, pretrained_from: str | None = None) -> dict:
    """Run (or resume) the benchmark grid (folds x fractions x variants): :func:`plan`, then
    :func:`execute` each run, then :func:`report`; returns the ``results.json`` content.

    ``folds`` (default: the spec's, per data layout) and ``seed`` fix the cross-validation
    (:func:`medssl.data.make_fold`); an ``out`` already used with other folds or seed is refused.
    ``variants`` (comma-separated names; default all) limits which variants are trained now; runs of
    the other variants already finished under ``out`` (from an earlier call) are still reported, so
    a costly comparison can be run at fewer fractions than method and baseline into one ``out``.
    ``reevaluate`` runs the evaluation stage again on the finished runs of the selected variants
    (their trained models and training times are kept): for a changed evaluation, without retraining.
    ``workers`` > 1 trains that many runs at once, each in its own process with its share of this
    process's torch threads (for a GPU or many-core machine; the numbers equal a sequential run's only up to the
    nondeterminism of the device): :func:`_train_in_parallel`.
    ``figures`` > 0 draws that many test cases of each evaluation of ``method`` and ``baseline`` (the bundle's
    ``save_figures``; runs finished earlier need ``reevaluate``) and stacks each case's two figures
    (:func:`side_by_side_figures`).
    ``pretrained_from`` (another benchmark's ``out``) takes its finished pretrainings instead of pretraining
    again, where they are the same (:func:`adopt_pretrainings`): e.g. a budget with longer fine-tuning and the
    same pretraining.
    """
    spec, ctx, runs, out_dir, earlier = _prepare(bundle, load_spec(bundle), data_dir, fractions, folds, seed, budget,
                                                 out, logging_file, variants)
    sources = set(earlier.get("pretrained_from", []))  # an earlier call's, kept
    if pretrained_from and adopt_pretrainings(runs, ctx, out_dir, Path(pretrained_from)):
        sources.add(str(Path(pretrained_from).resolve()))
    if sources:
        ctx.results["pretrained_from"] = sorted(sources)
    ctx.figures = int(figures)
    results = ctx.results
    results["runs"] = [r for r in _execute_all(runs, ctx, budget, reevaluate, progress, out_dir, int(workers)) if r]
    extra = []
    if spec.inference_region:
        served = served_regions(spec.inference_region, out_dir, range(results["folds"]), results["fractions"])
        extra = add_served_region(results["runs"], spec.inference_region, served)
        if extra:
            results["inference_region"] = {**spec.inference_region,
                                           "served": {f"fold{k}/f{f:g}": g for (k, f), g in sorted(served.items())}}
    if spec.verdict_on:
        results["verdict_on"] = spec.verdict_on
    report(results, spec.names, spec.reference, spec.pairs, {n: v.pretrain for n, v in spec.variants.items()}, extra)
    # a resumed call that trains little must not report its own small footprint as the benchmark's
    results["peak_rss_mb"] = max(_peak_rss_mb(), earlier.get("peak_rss_mb") or 0.0)
    write_reports(results, out_dir)
    if ctx.figures:
        side_by_side_figures(runs, out_dir)
    return results


def side_by_side_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """For each fold and fraction, each case drawn by both :data:`FIGURE_VARIANTS` (their evaluations'
    ``figures/<case>.png``) as ``out/figures/fold{k}_f{fraction}/<case>.png``: method above baseline."""
    from ..engines.figures import stack_figures

    top, bottom = FIGURE_VARIANTS
    dirs = {(r.fold, r.fraction, r.name): r.dir / "figures" for r in runs if r.kind == "variant"}
    written = []
    for (fold, fraction, name), folder in sorted(dirs.items()):
        other = dirs.get((fold, fraction, bottom))
        if name != top or other is None:
            continue
        for png in sorted(folder.glob("*.png")):
            if (other / png.name).is_file():
                written.append(stack_figures({top: png, bottom: other / png.name},
                                             out_dir / "figures" / f"fold{fold}_f{fraction:g}" / png.name))
    return written


def _levels(runs: list[Run], spec: BenchmarkSpec) -> list[list[Run]]:
    """The plan's runs by how many first phases precede them: the pretrainings and the variants that continue
    nothing, then those that continue one of them, and so on (each level starts from the level before)."""
    def depth(name: str) -> int:
        v = spec.variants[name]
        return 0 if not v.continues else 1 + depth(v.continues[0])

    levels: dict[int, list[Run]] = {}
    for run in runs:
        levels.setdefault(0 if run.kind == "pretrain" else depth(run.name), []).append(run)
    return [levels[k] for k in sorted(levels)]


def _start_step(run: Run, ctx: Context, chosen: Mapping) -> int | None:
    """The snapshot step a continuing variant's run starts from: the one its first phase is scored at."""
    v = ctx.spec.variants[run.name]
    return chosen.get((run.fraction, v.continues[0]), {}).get("step") if v.continues else None


def _execute_all(runs: list[Run], ctx: Context, budget: str, reevaluate: bool, progress: bool,
                 out_dir: Path, workers: int = 1) -> list[dict | None]:
    """:func:`execute` every run of the plan, the variants' records in plan order (None: not run). Where the
    budget has ``select_step`` (and ``train.snapshot_steps``), every run is trained first, level by level
    (:func:`_levels`), and each (fraction, variant) then evaluated at the training length :func:`select_steps`
    chose on validation (``results["selected_steps"]``); a variant that continues another starts from that
    one's model at its chosen step, the model it is scored with. ``workers`` > 1 trains each level's runs
    that many at a time (:func:`_train_in_parallel`). ``results.json`` is rewritten after each evaluated run."""
    from tqdm.auto import tqdm

    results, budget_spec = ctx.results, ctx.spec.budgets[budget]
    steps = budget_spec.get("train", {}).get("snapshot_steps") if budget_spec.get("select_step") else None
    chosen: dict = {}
    if steps or workers > 1:
        for level in _levels(runs, ctx.spec):
            if workers > 1:
                _train_in_parallel(level, ctx, workers, chosen)
            if not steps:
                continue
            trained = {}
            bar = tqdm(level, desc=f"{ctx.bundle}: train", disable=not progress)
            for run in bar:
                bar.set_postfix_str(run.label)
                if run.kind == "pretrain":
                    record = execute(run, ctx)  # None: a pretraining no selected variant needs, left unfinished
                    if record:
                        _record_pretraining(results, run, record)
                elif run.selected or (run.dir / "trained.json").is_file():
                    record = train_run(run, ctx, _start_step(run, ctx, chosen))
                    trained.setdefault((run.fraction, run.name), []).append(record)
            chosen.update(select_steps(trained, steps))
        if steps:
            results["selected_steps"] = [{"fraction": f, "variant": v, **c} for (f, v), c in chosen.items()]
    records = []
    bar = tqdm(runs, desc=f"{ctx.bundle}: evaluate" if steps else ctx.bundle, disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.label)
        record = execute(run, ctx, reevaluate, chosen.get((run.fraction, run.name), {}).get("step"))
        if run.kind == "pretrain":
            if record:
                _record_pretraining(results, run, record)
            continue
        records.append(record)
        results["runs"] = [r for r in records if r]
        atomic_write_json(results, out_dir / "results.json")
    return records


def _train_one(run: Run, ctx: Context, threads: int, start_step: int | None) -> None:
    """One task of :func:`_train_in_parallel`: a pretraining, or a variant's training."""
    import torch

    torch.set_num_threads(threads)
    if run.kind == "pretrain":
        execute(run, ctx)
    else:
        train_run(run, ctx, start_step)


def _train_in_parallel(runs: list[Run], ctx: Context, workers: int, chosen: Mapping | None = None) -> None:
    """Train ``workers`` runs at a time (one level of :func:`_levels`), each in a spawned process with its share
    of this process's torch threads: every pretraining and every selected variant run, a continuing one from its
    first phase's step in ``chosen``. Runs that start from no pretraining are queued at once behind the
    pretrainings, the others as soon as their fold's pretraining is done, so no worker waits for another fold's
    pretraining. Every run leaves its usual files, so :func:`_execute_all` then only selects and evaluates (and
    a cut run is retrained as ever)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // workers)
    todo = [r for r in runs if r.kind == "variant" and r.selected]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pretrained = {r.dir / "pretrained.pt": pool.submit(_train_one, r, ctx, threads, None)
                      for r in runs if r.kind == "pretrain"}
        after = {}  # pretraining future -> the runs that start from it
        tasks = list(pretrained.values())
        for run in todo:
            need = pretrained.get(run.pretrained) if run.pretrained else None
            if need is None:
                tasks.append(pool.submit(_train_one, run, ctx, threads, _start_step(run, ctx, chosen or {})))
            else:
                after.setdefault(need, []).append(run)
        for need in as_completed(after):  # in the order the pretrainings finish
            need.result()  # a pretraining's error is raised here, before its fine-tunings start
            tasks += [pool.submit(_train_one, run, ctx, threads, None) for run in after[need]]
        for done in tasks:
            done.result()  # a worker's error is raised here


def _record_pretraining(results: dict, run: Run, record: dict) -> None:
    results.setdefault("pretrain_seconds", {}).setdefault(run.name, {})[str(run.fold)] = record["pretrain_seconds"]
    if "loss_curve" in record:
        results.setdefault("pretrain_curves", {}).setdefault(run.name, {})[str(run.fold)] = \
            {k: v for k, v in record.items() if k != "pretrain_seconds"}
    health = read_health(run.dir)
    if health is not None:
        results.setdefault("pretext_health", {}).setdefault(run.name, {})[str(run.fold)] = health


def _prepare(bundle, spec, data_dir, fractions, folds, seed, budget, out, logging_file, variants):
    """Check the arguments and the data set (every problem before any training); the spec, the shared
    :class:`Context`, the :func:`plan`, the output folder and an earlier call's results there."""
    if budget not in spec.budgets:
        raise ValueError(f"budget must be one of {sorted(spec.budgets)}, got {budget!r}")
    fractions, seed = _parse_list(fractions, float), int(seed)
    selected = spec.names if variants is None else _parse_list(variants, str)  # the sweep: all of its spec's
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
    label_unit = str(split_args.get("label_unit", "case"))
    previous = out_dir / "results.json"  # an earlier call's peak memory (results.json is rewritten below)
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    if earlier and (earlier.get("folds"), earlier.get("seed")) != (num_folds, seed):
        raise ValueError(f"{out_dir}: holds a benchmark with folds={earlier.get('folds')}, seed={earlier.get('seed')}; "
                         f"expected folds={num_folds}, seed={seed} (or another --out)")
    if earlier and earlier.get("label_unit", "case") != label_unit:  # its finished runs used other labels
        raise ValueError(f"{out_dir}: holds a benchmark with label_unit={earlier.get('label_unit', 'case')!r}; "
                         f"expected {label_unit!r} (the spec's split for this layout; or another --out)")
    results = {"bundle": bundle, "dataset": Path(data_dir).name, "data_dir": data_dir, "budget": budget,
               "budget_overrides": spec.budgets[budget], "fractions": fractions, "folds": num_folds, "seed": seed,
               "val_fraction": val_fraction, **({"label_unit": label_unit} if label_unit != "case" else {}),
               "regions": regions, "runs": []}
    ctx = Context(bundle, spec, {"dataset_dir": data_dir, "seed": seed, **data_overrides}, seed, logging_file, results)
    runs = plan(spec, cases, out_dir, fractions, num_folds, seed, val_fraction, budget, selected, data_dir, label_unit)
    return spec, ctx, runs, out_dir, earlier


def write_reports(results: dict, out_dir: Path) -> None:
    """``results.json``, ``results.md``, ``label_efficiency.png`` and, where the runs logged curves,
    ``validation_curves.png`` and ``pretext_curves.png``."""
    atomic_write_json(results, out_dir / "results.json")
    atomic_write_text(results_markdown(results), out_dir / "results.md")
    plot_label_efficiency(results, out_dir / "label_efficiency.png")
    if any(r.get("val_curve") for r in results["runs"]):
        plot_validation_curves(results, out_dir / "validation_curves.png")
    if results.get("pretrain_curves"):
        plot_pretext_curves(results, out_dir / "pretext_curves.png")
    if _term_names(results):
        plot_term_curves(results, out_dir / "loss_terms.png")


def run_sweep(bundle: str, data_dir: str, name: str = "pretraining_length", budget: str = "converged",
              out: str = "sweep_out", progress: bool = True, logging_file: str | bool | None = None) -> dict:
    """The pretraining-length sweep of ``bundle`` (its spec's ``sweeps[name]``: ``variant``, ``fraction``,
    ``fold``, ``steps`` (pretraining lengths; 0 = no pretraining, the ``baseline`` variant) and ``folds``):
    on that one fold, the variant fine-tuned at that fraction from pretrainings of each length (each its
    own run, the learning-rate schedule scaled to its length). Writes ``sweep.json`` and ``sweep.png``
    (fine-tuned test Dice against pretraining steps) to ``out``; resumable like the benchmark."""
    spec = load_spec(bundle)
    sweep = spec.sweeps[name]
    if "override" in sweep:  # a sweep over one config id's value (e.g. a method's K)
        return run_override_sweep(bundle, data_dir, name, budget, out, progress, logging_file)
    epoch_length = int(spec.budgets[budget]["pretrain"].get("epoch_length", 1))
    lengths = [int(s) for s in sweep["steps"]]
    pretrainings = {f"{sweep['variant']}_{s}": {**spec.pretrainings[spec.variants[sweep["variant"]].pretrain],
                                                 "max_epochs": max(1, s // epoch_length)} for s in lengths if s}
    spec_s = BenchmarkSpec(dataset=spec.dataset, regions=spec.regions, budgets=spec.budgets, layouts=spec.layouts,
                           pretrainings={**spec.pretrainings, **pretrainings}, folds=spec.folds,
                           variants={**{p: Variant(dict(spec.variants[sweep["variant"]].train), p) for p in pretrainings},
                                     "baseline": spec.variants["baseline"]})
    _, ctx, runs, out_dir, _ = _prepare(bundle, spec_s, data_dir, [float(sweep["fraction"])], sweep.get("folds"), 0,
                                        budget, out, logging_file, None)
    fold = int(sweep.get("fold", 0))
    rows = []
    for record in _execute_all([r for r in runs if r.fold == fold], ctx, budget, False, progress, out_dir):
        steps = 0 if record["variant"] == "baseline" else int(record["variant"].rsplit("_", 1)[1])
        rows.append({"pretrain_steps": steps, **record})
    rows.sort(key=lambda r: r["pretrain_steps"])
    result = {"bundle": bundle, "sweep": name, "budget": budget, "fold": fold,
              "folds": ctx.results["folds"], "fraction": float(sweep["fraction"]), "variant": sweep["variant"],
              "regions": ctx.results["regions"], "rows": rows}
    atomic_write_json(result, out_dir / "sweep.json")
    plot_sweep(result, out_dir / "sweep.png")
    return result


def run_override_sweep(bundle: str, data_dir: str, name: str, budget: str = "converged", out: str = "sweep_out",
                       progress: bool = True, logging_file: str | bool | None = None) -> dict:
    """A sweep of ``bundle`` over the value of one config id (its spec's ``sweeps[name]``: ``override`` the
    id, ``values``, ``variant``, ``fraction``, ``fold`` (one fold or a list), ``folds``, ``evaluate``
    (overrides of the evaluation, e.g. ``{"eval_split": "validation"}`` to score every value on the
    folds' validation cases, never their test cases) and ``report`` (metrics of the evaluation's report
    to tabulate besides the Dice)): the variant trained once per value, on each listed fold, at that
    fraction, with the budget. Writes ``sweep.json`` (a row per run; ``summary``: per value, the mean over
    the folds of the Dice and of each ``report`` metric) and ``sweep.png``; resumable like the benchmark."""
    spec = load_spec(bundle)
    sweep = spec.sweeps[name]
    key, values, base = sweep["override"], list(sweep["values"]), spec.variants[sweep["variant"]]
    names = {f"{sweep['variant']}_{key}_{v}": v for v in values}
    variants = {n: Variant({**base.train, key: v, **sweep.get("evaluate", {})}, base.pretrain, base.stage, base.continues)
                for n, v in names.items()}
    spec_s = BenchmarkSpec(dataset=spec.dataset, regions=spec.regions, budgets=spec.budgets, layouts=spec.layouts,
                           pretrainings=spec.pretrainings, folds=spec.folds, variants=variants)
    _, ctx, runs, out_dir, _ = _prepare(bundle, spec_s, data_dir, [float(sweep["fraction"])], sweep.get("folds"), 0,
                                        budget, out, logging_file, None)
    folds = [int(f) for f in _parse_list(sweep.get("fold", 0), int)]
    metrics = ["mean_dice", *sweep.get("report", [])]
    rows = [{"value": names[r["variant"]], **r}
            for r in _execute_all([r for r in runs if r.fold in folds], ctx, budget, False, progress, out_dir) if r]
    rows.sort(key=lambda r: (values.index(r["value"]), r["fold"]))
    summary = [{"value": v, "n_folds": len(sel), **{m: _mean([r.get(m) for r in sel], 4) for m in metrics}}
               for v in values if (sel := [r for r in rows if r["value"] == v])]
    result = {"bundle": bundle, "sweep": name, "budget": budget, "override": key, "fold": folds,
              "folds": ctx.results["folds"], "fraction": float(sweep["fraction"]), "variant": sweep["variant"],
              "split": sweep.get("evaluate", {}).get("eval_split", "test"), "metrics": metrics,
              "regions": ctx.results["regions"], "summary": summary, "rows": rows}
    atomic_write_json(result, out_dir / "sweep.json")
    plot_override_sweep(result, out_dir / "sweep.png")
    return result


def report(results: dict, names: Sequence[str], reference: tuple[str, float] | None = None,
           pairs: Mapping | None = None, pretrain_of: Mapping | None = None, extra_regions: Sequence[str] = ()) -> dict:
    """Add to ``results`` (its ``runs``, ``fractions`` and ``regions``) the ``summary`` rows, the paired
    ``comparisons`` with ``baseline`` (labelled "pretext not learned" where a variant's pretraining, named
    by ``pretrain_of``, did not beat its trivial solution: :func:`medssl.apps.pretext_report.label_verdicts`)
    and, given a ``reference`` (variant, fraction), the ``ratio_to_reference`` rows; returns ``results``.
    ``extra_regions`` (e.g. the served network's, :mod:`medssl.apps.inference_region`) are summarised and compared
    beside ``regions``, outside the per-case mean over ``regions``."""
    runs, fractions, regions = results["runs"], results["fractions"], results["regions"]
    extra = list(extra_regions)
    if extra:
        results["extra_regions"] = extra
    results["summary"] = summarise(runs, fractions, names, regions, extra)
    results["comparisons"] = compare(runs, fractions, names, regions, extra=extra)
    for pair in (pairs or {}).values():  # the spec's other pairs (a pair against baseline is compared above)
        if pair["against"] != "baseline":
            results["comparisons"] += compare(runs, fractions, [pair["variant"]], regions, baseline=pair["against"],
                                              extra=extra)
    label_verdicts(results, pretrain_of or {})
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


def summarise(runs: list[dict], fractions, names, regions, extra: Sequence[str] = ()) -> list[dict]:
    """Per (fraction, variant): means over all test cases of all folds (``n_cases``), with the std over
    cases and a 95% bootstrap CI of the mean of the per-case mean Dice over regions; per-region Dice and
    HD95 (``regions`` and ``extra``); and means over folds of training time, labelled cases and every other numeric metric the runs
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
                "dice": {g: _mean(_region_values(dice, g, regions).values(), 4) for g in [*regions, *extra]},
                "mean_hd95": _mean(_region_values(hd95, "mean", regions).values(), 2),
                "hd95": {g: _mean(_region_values(hd95, g, regions).values(), 2) for g in [*regions, *extra]},
                "train_seconds": _mean([r["train_seconds"] for r in sel], 1),
                "labelled_cases": _mean([r["labelled_cases"] for r in sel], 1),
                "metrics": {k: _mean([r[k] for r in sel], 4) for k in sorted(common)
                            if all(_is_number(r[k]) and r[k] is not None for r in sel)},
            })
    return rows


def compare(runs: list[dict], fractions, names, regions, baseline: str = "baseline",
            extra: Sequence[str] = ()) -> list[dict]:
    """Per fraction, each variant against ``baseline`` on the same test cases of the folds both ran: the
    paired per-case Dice differences pooled over folds, per region (``regions`` and ``extra``) and for the
    per-case mean over ``regions`` (``region="mean"``), through :func:`medssl.apps.stats.paired_bootstrap` (mean difference,
    95% CI, cases better / worse, verdict)."""
    rows = []
    for f in fractions:
        base = {r["fold"]: r for r in runs if r["fraction"] == f and r["variant"] == baseline}
        for name in names:
            sel = [r for r in runs if r["fraction"] == f and r["variant"] == name and r["fold"] in base]
            if name == baseline or not sel:
                continue
            mine, theirs = pooled(sel), pooled([base[r["fold"]] for r in sel])
            for region in ["mean", *regions, *extra]:
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
    rows, regions = results["summary"], [*results["regions"], *results.get("extra_regions", [])]
    lines = [f"# {results['bundle']} on {results['dataset']} (budget: {results['budget']}, "
             f"{results['folds']}-fold cross-validation, seed {results['seed']})", "",
             "Test-set Dice over all test cases of all folds (every case is tested once): mean ± std over cases "
             "and a 95% bootstrap CI of the mean; HD95 in voxels/pixels; labelled cases and train s: means over "
             "folds. `method` = the bundle's method, `baseline` = its baseline; other rows are the comparisons "
             "and ablations named in the bundle's docs.", ""]
    if results.get("verdict_on"):
        lines += [f"Verdicts are about: {results['verdict_on']}", ""]
    if results.get("inference_region"):
        entry = results["inference_region"]
        lines += [f"Region `{entry['name']}`: {entry.get('notes', '')} (per fold and fraction: "
                  + ", ".join(f"{k} {g}" for k, g in entry["served"].items()) + ").", ""]
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
                  "CI over cases; better/worse: the verdict where the CI excludes 0; a row `a vs b`: a pair the bundle's "
                  "benchmark.json names, b in place of the baseline):", "",
                  "| fraction | variant | region | mean Δ Dice | 95% CI | better/worse cases | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["comparisons"]:
            name = c["variant"] if c["baseline"] == "baseline" else f"{c['variant']} vs {c['baseline']}"
            lines.append(f"| {c['fraction']:g} | {name} | {c['region']} | {_fmt(c['mean'], '+.3f')} | "
                         f"[{_fmt(c['ci'][0], '+.3f')}, {_fmt(c['ci'][1], '+.3f')}] | {c['better']}/{c['worse']} | "
                         f"{c['verdict']} |")
    lines += health_markdown(results)
    if results.get("selected_steps"):
        steps = sorted({int(k) for s in results["selected_steps"] for k in s["validation"]})
        lines += ["", "Training length chosen on validation: the snapshot step whose validation mean Dice, averaged "
                  "over the folds (each fold's validation cases, never its test cases), is best; every run of that "
                  "(fraction, variant) is evaluated at it:", "",
                  "| fraction | variant | chosen step | " + " | ".join(f"val @{s}" for s in steps) + " |",
                  "|" + "---|" * (3 + len(steps))]
        for s in results["selected_steps"]:
            lines.append(f"| {s['fraction']:g} | {s['variant']} | {s['step']} | "
                         + " | ".join(_fmt(s["validation"].get(str(k), s["validation"].get(k))) for k in steps) + " |")
    if results.get("ratio_to_reference"):
        ref = results["reference"]
        lines += ["", f"Dice as a fraction of `{ref['variant']}` at fraction {ref['fraction']:g} (same fold; "
                  "mean ± std over folds):", "", "| fraction | variant | " + " | ".join(results["regions"]) + " |",
                  "|" + "---|" * (2 + len(results["regions"]))]
        for r in results["ratio_to_reference"]:
            lines.append(f"| {r['fraction']:g} | {r['variant']} | "
                         + " | ".join(f"{_fmt(r[g]['ratio'])} ± {_fmt(r[g]['std'])}" for g in results["regions"])
                         + " |")
    return "\n".join(lines) + "\n"


def plot_label_efficiency(results: dict, path: Path) -> None:
    """Mean test Dice against label fraction, one line per variant, with the 95% bootstrap CI of the mean
    over cases as error bars."""
    plt = _pyplot()
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
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)


def plot_validation_curves(results: dict, path: Path) -> None:
    """Each run's validation mean Dice against training steps: one panel per label fraction, one colour per
    variant, one line per fold, a dot at the step whose model was kept (the best validation)."""
    plt = _pyplot()
    fractions = results["fractions"]
    # at least 6.4 inches wide: one fraction's panel must still hold the title
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(4.2 * len(fractions), 6.4), 3.4), dpi=110, squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["variant"] for r in results["runs"]))}
    for ax, f in zip(axes[0], fractions):
        for r in results["runs"]:
            pts = [p for p in r.get("val_curve", []) if p[1] is not None]
            if r["fraction"] != f or not pts:
                continue
            x, y = zip(*pts)
            ax.plot(x, y, color=colours[r["variant"]], alpha=0.7, lw=1,
                    label=r["variant"] if r["fold"] == min(q["fold"] for q in results["runs"]) else None)
            best = dict(pts).get(r.get("best_step"))
            if best is not None:
                ax.plot([r["best_step"]], [best], "o", color=colours[r["variant"]], ms=3)
        ax.set_title(f"{f:.0%} of the labels", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation mean Dice")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['bundle']}: validation curves, one line per fold ({results['budget']} budget)", fontsize=9)
    _save(fig, path)


def _term_names(results: dict) -> list[str]:
    """The training-loss terms whose curves (``<term>_curve``, :func:`training_curve`) some run kept."""
    return sorted({k[:-len("_curve")] for r in results["runs"] for k in r
                   if k.endswith("_curve") and k not in ("val_curve", "loss_curve") and r[k]})


def plot_term_curves(results: dict, path: Path) -> None:
    """The training-loss terms the spec's ``curves`` names (e.g. PReL's pseudo-label loss), against training steps:
    one panel per (term, label fraction), one colour per variant that logged it, one line per fold."""
    plt = _pyplot()
    cells = [(t, f) for t in _term_names(results) for f in results["fractions"]
             if any(r.get(f"{t}_curve") and r["fraction"] == f for r in results["runs"])]
    fig, axes = plt.subplots(1, len(cells), figsize=(max(4.2 * len(cells), 6.4), 3.4), dpi=110, squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["variant"] for r in results["runs"]))}
    for ax, (t, f) in zip(axes[0], cells):
        labelled = set()
        for r in (r for r in results["runs"] if r["fraction"] == f and r.get(f"{t}_curve")):
            x, y = zip(*r[f"{t}_curve"])
            ax.plot(x, y, color=colours[r["variant"]], alpha=0.7, lw=1,
                    label=None if r["variant"] in labelled else r["variant"])
            labelled.add(r["variant"])
        ax.set_title(f"{t}, {f:.0%} of the labels", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['bundle']}: training-loss terms, one line per fold ({results['budget']} budget)", fontsize=9)
    _save(fig, path)


def plot_pretext_curves(results: dict, path: Path) -> None:
    """Each pretraining's pretext loss (and its other logged terms) against steps, one line per fold, and its
    pretext health per fold beside its trivial solution's (:func:`medssl.apps.pretext_report.plot_health`)."""
    plt = _pyplot()
    curves, health = results["pretrain_curves"], results.get("pretext_health", {})
    panels = [(name, key) for name, folds in curves.items()
              for key in dict.fromkeys(k for c in folds.values() for k in c if k.endswith("_curve"))]
    checks = [name for name, folds in health.items() if any(h and "value" in h for h in folds.values())]
    n = len(panels) + len(checks)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0][len(panels):], checks):
        plot_health(ax, name, health[name])
    for ax, (name, key) in zip(axes[0], panels):
        for fold, c in sorted(curves[name].items()):
            if c.get(key):
                x, y = zip(*c[key])
                ax.plot(x, y, lw=1, label=f"fold {fold}")
        ax.set_title(f"pretraining {name!r}: {key[:-len('_curve')]}", fontsize=9)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_sweep(result: dict, path: Path) -> None:
    """Fine-tuned test Dice against pretraining length: the mean over the fold's test cases with each case's
    mean Dice as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    rows = result["rows"]
    xs = list(range(len(rows)))
    for x, r in zip(xs, rows):
        per_case = [v for v in _region_values(r["cases"], "mean", result["regions"]).values() if v is not None]
        ax.plot([x] * len(per_case), per_case, ".", color="grey", alpha=0.6)
    ax.plot(xs, [r["mean_dice"] for r in rows], "o-", color="C0", label="mean over test cases")
    ax.set_xticks(xs, [f"{r['pretrain_steps']:,}" for r in rows])
    ax.set_xlabel("pretraining steps (0 = from scratch)")
    ax.set_ylabel("fine-tuned test Dice")
    ax.set_title(f"{result['bundle']}: {result['variant']} at {result['fraction']:.0%} of the labels, fold "
                 f"{result['fold']} of {result['folds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_override_sweep(result: dict, path: Path) -> None:
    """An override sweep's metrics against the swept value: one panel per metric, the mean over the folds
    (line) and each fold's value (dots)."""
    plt = _pyplot()
    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), dpi=110, squeeze=False)
    xs = {s["value"]: i for i, s in enumerate(result["summary"])}
    for ax, m in zip(axes[0], metrics):
        pts = [(xs[r["value"]], r.get(m)) for r in result["rows"] if r.get(m) is not None]
        if pts:
            ax.plot(*zip(*pts), ".", color="grey", alpha=0.6)
        ax.plot(list(xs.values()), [s[m] for s in result["summary"]], "o-", color="C0")
        ax.set_xticks(list(xs.values()), [str(v) for v in xs])
        ax.set_xlabel(result["override"])
        ax.set_title(f"{m} ({result['split']})", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['bundle']}: {result['variant']} at {result['fraction']:.0%} of the labels, folds "
                 f"{result['fold']} of {result['folds']} ({result['budget']} budget)", fontsize=9)
    _save(fig, path)
