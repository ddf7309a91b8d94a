"""``medssl benchmark``: label-efficiency of a method against its baseline and other variants.

A bundle's benchmark is a set of named *variants* (``method``, ``baseline`` and, where the issue asks,
comparisons and ablations), each a set of ``train`` overrides plus, optionally, the name of a
*pretraining* (a set of ``pretrain`` overrides) whose weights it starts from. For each seed: one
seeded split (train/validation/test; the labelled subsets are nested across fractions), each
pretraining once on all training cases (labels unused), then for each label fraction every variant
fine-tuned on the same labelled cases and evaluated on the seed's test cases. Every finished run is
kept on disk, so an interrupted benchmark resumes where it stopped. Writes ``results.json`` (each run's
``init`` is its variant name), ``results.md`` and ``label_efficiency.png`` to ``out``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundles import bundle_path, run_stage
from ..data import LAYOUTS, detect_layout, make_split, write_datalist, check_cases
from ..utils import atomic_write, atomic_write_json, atomic_write_text


@dataclass
class Variant:
    """``train`` overrides of one compared run; ``pretrain`` names the pretraining it starts from.

    ``stage`` is the bundle stage that trains it (default ``train``; None: no training, only the
    evaluation - with the variant's overrides - of the continued variant's model); ``continues=(variant, id)`` makes
    it a second phase: it starts from the ``model.pt`` of that (earlier listed) variant's run at the same
    fraction and seed, passed as config id ``id`` (e.g. Semi-CML's PReL stage after contrastive mutual
    learning); its ``train_seconds`` include the first phase's."""

    train: dict = field(default_factory=dict)
    pretrain: str | None = None
    stage: str | None = "train"
    continues: tuple[str, str] | None = None


@dataclass
class BenchmarkSpec:
    dataset: str
    regions: Sequence[str]
    budgets: dict = field(default_factory=dict)  # budget -> {"pretrain": overrides, "train": overrides}
    variants: dict = field(default_factory=lambda: {"method": Variant({"init": "method"}, "method"),
                                                    "baseline": Variant({"init": "baseline"})})
    pretrainings: dict = field(default_factory=lambda: {"method": {}})  # name -> pretrain overrides
    # per data layout ("brats", "nuclei"): {"regions": [...], "overrides": {ids for every stage},
    # "split": {make_split keyword arguments}}; a layout not listed uses ``regions`` and the defaults
    layouts: dict = field(default_factory=dict)
    # (variant, fraction): each run's Dice is also reported as a ratio to this reference's Dice at the
    # same seed and region (e.g. ("baseline", 1.0): full supervision, the upper bound)
    reference: tuple[str, float] | None = None

    def for_layout(self, layout: str) -> tuple[list[str], dict, dict]:
        """(regions, stage overrides, split keyword arguments) for a data set of ``layout``."""
        entry = self.layouts.get(layout, {})
        return list(entry.get("regions", self.regions)), dict(entry.get("overrides", {})), dict(entry.get("split", {}))

    @property
    def inits(self) -> list[str]:
        return list(self.variants)


# budgets of the 3D BraTS bundles (batch 2 x 4 x 64^3): pretrain / train overrides of each stage
BRATS_3D_BUDGETS = {
    # the configs' own defaults (100 epochs x 50 iterations each): a GPU budget
    "full": {"pretrain": {}, "train": {}},
    # 500 pretraining and 400 fine-tuning steps of batch 2 x 4 x 64^3: about 3 min per
    # (fraction, seed) pair of method + baseline on 2 CPU cores
    "small": {"pretrain": {"max_epochs": 20, "epoch_length": 25},
              "train": {"max_epochs": 16, "epoch_length": 25, "val_interval": 4}},
    # a few steps, for tests of the harness itself; its numbers mean nothing
    "smoke": {"pretrain": {"max_epochs": 1, "epoch_length": 2},
              "train": {"max_epochs": 1, "epoch_length": 2, "val_interval": 1}},
}

BENCHMARKS = {
    "context_restoration": BenchmarkSpec(
        dataset="brats18_2mm",
        regions=("TC", "WT", "ET"),
        budgets=BRATS_3D_BUDGETS,
    ),
    # Zhang et al. 2025 (issue 3). Measured on 2 CPU cores: a fine-tuning step (batch 8 x 128^2, with the
    # lesion-aware loss) 0.63 s, a Barlow Twins step (16 images x 2 views) 1.05 s. On DSB the split keeps
    # 15% (100 images) for test and 10% for validation: full-size sliding-window evaluation costs about
    # 0.35 s per image on 2 cores, and it runs once per variant.
    "dfr_barlow": BenchmarkSpec(
        dataset="dsb2018_nuclei",
        regions=("nucleus",),
        layouts={"nuclei": {"split": {"test_fraction": 0.15, "val_fraction": 0.1}},
                 # the secondary data set: BraTS axial slices, whole tumour (the bundle's dataset_name switch)
                 "brats": {"regions": ["WT"], "overrides": {"dataset_name": "brats18_2mm"}}},
        pretrainings={"dfr": {},
                      "dfr_no_attention": {"channel_attention": False, "spatial_attention": False},
                      "plain_unet": {"channel_attention": False, "spatial_attention": False, "dilation": False,
                                     "compression": False}},
        variants={
            "method": Variant({"init": "method"}, "dfr"),
            # the paper's baseline: a plain U-Net (same depth and widths) trained from scratch
            "baseline": Variant({"init": "baseline", "channel_attention": False, "spatial_attention": False,
                                 "dilation": False, "compression": False, "lac_weight": 0.0}),
            # the paper's "vanilla self-supervised" comparison: plain U-Net encoder + vanilla Barlow Twins
            "vanilla_barlow_twins": Variant({"init": "method", "channel_attention": False,
                                             "spatial_attention": False, "dilation": False, "compression": False,
                                             "lac_weight": 0.0}, "plain_unet"),
            "no_attention": Variant({"init": "method", "channel_attention": False, "spatial_attention": False},
                                    "dfr_no_attention"),
            "no_lesion_loss": Variant({"init": "method", "lac_weight": 0.0}, "dfr"),
        },
        budgets={
            "full": {"pretrain": {}, "train": {}},
            # 120 Barlow Twins steps per pretraining, 100 fine-tuning steps validated once at the end
            "small": {"pretrain": {"max_epochs": 8, "epoch_length": 15},
                      "train": {"max_epochs": 4, "epoch_length": 25, "val_interval": 4}},
            "smoke": {"pretrain": {"max_epochs": 1, "epoch_length": 2, "batch_size": 4},
                      "train": {"max_epochs": 1, "epoch_length": 2, "val_interval": 1, "batch_size": 4}},
        },
    ),
    # Wang et al. 2025 (issue 4): the same 3D U-Net and budgets as context_restoration, so the pretexts compare
    "slem": BenchmarkSpec(
        dataset="brats18_2mm",
        regions=("TC", "WT", "ET"),
        pretrainings={"block_mix": {}, "context_restoration": {"pretext": "context_restoration"}},
        variants={
            "method": Variant({"init": "method"}, "block_mix"),
            # the same U-Net without CFB and without pretext
            "baseline": Variant({"init": "baseline", "context_fusion": False}),
            "cfb_no_pretext": Variant({"init": "baseline"}),
            # our other self-supervised pretext on the same network (CFB included)
            "context_restoration": Variant({"init": "method"}, "context_restoration"),
        },
        budgets=BRATS_3D_BUDGETS,
    ),
    # Zhang et al. 2023 (issue 5): every run trains and evaluates BOTH modality networks ("regions" are the
    # modalities; the region segmented is whole tumour). Smaller U-Nets than the other BraTS bundles: each
    # step runs two networks on 2 labelled + 2 unlabelled crops.
    "semi_cml": BenchmarkSpec(
        dataset="brats18_2mm",
        regions=("flair", "t2"),
        variants={
            "baseline": Variant({"method": "supervised"}),  # labels only; at fraction 1.0: the upper bound
            "mean_teacher": Variant({"method": "mean_teacher"}),
            "cml": Variant({"method": "cml"}),  # Semi-CML without PReL
            "method": Variant({}, stage="prel", continues=("cml", "cml_ckpt")),  # Semi-CML + PReL
        },
        reference=("baseline", 1.0),
        budgets={
            "full": {"pretrain": {}, "train": {}},
            "small": {"pretrain": {}, "train": {"max_epochs": 8, "epoch_length": 25, "val_interval": 4,
                                                "rampup_epochs": 2, "channels": [8, 16, 32, 64, 128]}},
            "smoke": {"pretrain": {}, "train": {"max_epochs": 1, "epoch_length": 2, "val_interval": 1,
                                                "channels": [8, 16, 32, 64, 128]}},
        },
    ),
    # Kuang et al. 2023 (issue 6): image-level labels on every training slice, so one "fraction" (1.0);
    # evaluation on the test slices: Dice/HD95 on tumour slices, under-/over-segmentation, FP rate
    "cluster_resupervision": BenchmarkSpec(
        dataset="brats18_2mm",
        regions=("WT",),
        variants={
            "baseline": Variant({"method": "cam", "output": "cam"}),  # plain CAM thresholding
            "gradcam": Variant({"method": "cam", "output": "gradcam"}, stage=None, continues=("baseline", "ckpt_dir")),
            "no_reconstruction": Variant({"reconstruction_weight": 0.0}),
            "method": Variant({}),
            "supervised": Variant({"method": "supervised"}),  # pixel labels: the upper bound
        },
        budgets={
            "full": {"pretrain": {}, "train": {}},
            "small": {"pretrain": {}, "train": {"max_epochs": 10, "epoch_length": 20, "resupervision_start_epoch": 3,
                                                "rampup_epochs": 2}},
            "smoke": {"pretrain": {}, "train": {"max_epochs": 2, "epoch_length": 2, "batch_size": 4,
                                                "resupervision_start_epoch": 1, "rampup_epochs": 0,
                                                "channels": [8, 16, 32, 64, 128]}},
        },
    ),
}


def _parse_list(values, cast):
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif not isinstance(values, (list, tuple)):
        values = [values]
    return [cast(v) for v in values]


def run_benchmark(bundle: str, data_dir: str, fractions="0.1,0.2,1.0", seeds="0,1,2", budget: str = "small",
                  out: str = "benchmark_out", progress: bool = True, logging_file: str | bool | None = None,
                  variants=None, reevaluate: bool = False) -> dict:
    """Run (or resume) the benchmark grid; returns the ``results.json`` content.

    ``variants`` (comma-separated names; default all) limits which variants are trained now; runs of
    the other variants already finished under ``out`` (from an earlier call) are still reported, so
    a costly comparison can be run at fewer fractions than method and baseline into one ``out``.
    ``reevaluate`` runs the evaluation stage again on the finished runs of the selected variants
    (their trained models and training times are kept): for a changed evaluation, without retraining.
    """
    if bundle not in BENCHMARKS:
        raise ValueError(f"no benchmark defined for {bundle!r}; expected one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[bundle]
    if budget not in spec.budgets:
        raise ValueError(f"budget must be one of {sorted(spec.budgets)}, got {budget!r}")
    fractions, seeds = _parse_list(fractions, float), _parse_list(seeds, int)
    selected = spec.inits if variants is None else _parse_list(variants, str)
    unknown = sorted(set(selected) - set(spec.inits))
    if unknown:
        raise ValueError(f"unknown variants {unknown} for {bundle!r}; expected some of {spec.inits}")
    bundle_path(bundle)
    out_dir = Path(out).resolve()
    data_dir = str(Path(data_dir).resolve())
    layout = detect_layout(data_dir)
    cases = LAYOUTS[layout](data_dir)
    check_cases(cases, layout, context=f"data set {data_dir}")  # every problem, before any training
    regions, data_overrides, split_args = spec.for_layout(layout)
    overrides = spec.budgets[budget]
    previous = out_dir / "results.json"  # an earlier call's peak memory (results.json is rewritten below)
    earlier_peak = json.loads(previous.read_text()).get("peak_rss_mb") if previous.is_file() else None
    results = {"bundle": bundle, "dataset": Path(data_dir).name, "data_dir": data_dir, "budget": budget,
               "fractions": fractions, "seeds": seeds, "split": split_args, "runs": []}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * (1 + len(fractions) * len(selected)), desc=f"benchmark {bundle}",
               disable=not progress)
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        datalists = {}
        for f in fractions:
            split = make_split(cases, label_fraction=f, seed=seed, **split_args)
            datalists[f] = write_datalist(split, seed_dir / f"datalist_f{f:g}.json", data_dir)
        common = {"dataset_dir": data_dir, "seed": seed, **data_overrides}
        weights = {}
        for name in sorted({v.pretrain for v in spec.variants.values() if v.pretrain}):
            pre_dir = seed_dir / f"pretrain_{name}"
            weights[name] = pre_dir / "pretrained.pt"
            needed = any(spec.variants[v].pretrain == name for v in selected)
            if not weights[name].is_file() and not needed:
                continue
            if not weights[name].is_file():
                bar.set_postfix_str(f"seed {seed}: pretrain {name}")
                t0 = time.perf_counter()
                run_stage(bundle, "pretrain", logging_file, ckpt_dir=str(pre_dir),
                          datalist_file=str(datalists[max(fractions)]), **common,
                          **{**overrides["pretrain"], **spec.pretrainings[name]})
                atomic_write_json({"pretrain_seconds": time.perf_counter() - t0}, pre_dir / "timing.json")
            timing = json.loads((pre_dir / "timing.json").read_text())["pretrain_seconds"]
            results.setdefault("pretrain_seconds", {}).setdefault(name, {})[str(seed)] = round(timing, 1)
        bar.update(1)
        for f in fractions:
            for init, variant in spec.variants.items():
                run_dir = seed_dir / f"f{f:g}" / init
                record = run_dir / "run.json"

                def evaluate_and_record(ckpt_dir, train_seconds):  # called within this iteration only
                    # the budget's and the variant's overrides go to evaluation too (network sizes and
                    # switches must match; ids that evaluate.json does not use are inert there)
                    run_stage(bundle, "evaluate", logging_file, ckpt_dir=str(ckpt_dir), output_dir=str(run_dir),
                              datalist_file=str(datalists[f]), **common, **{**overrides["train"], **variant.train})
                    metrics = json.loads((run_dir / "metrics.json").read_text())
                    n_lab = sum(c.get("labelled", True) for c in json.loads(datalists[f].read_text())["training"])
                    atomic_write_json({"init": init, "fraction": f, "seed": seed, "labelled_cases": n_lab,
                                       "mean_dice": metrics["mean_dice"], "dice": metrics["dice"],
                                       "mean_hd95": metrics.get("mean_hd95"), "hd95": metrics.get("hd95"),
                                       "train_seconds": round(train_seconds, 1),
                                       "test_cases": metrics["num_cases"],
                                       **{k: metrics[k] for k in RUN_METRICS if k in metrics}},
                                      record)
                if init not in selected:
                    if record.is_file():  # finished by an earlier call: still part of the comparison
                        results["runs"].append(json.loads(record.read_text()))
                    continue
                ckpt_dir = seed_dir / f"f{f:g}" / variant.continues[0] if variant.stage is None else run_dir
                if record.is_file() and reevaluate:  # the trained model stays; only its evaluation is redone
                    bar.set_postfix_str(f"seed {seed}, fraction {f:g}: re-evaluate {init}")
                    previous_run = json.loads(record.read_text())
                    evaluate_and_record(ckpt_dir, previous_run["train_seconds"])
                elif not record.is_file():
                    bar.set_postfix_str(f"seed {seed}, fraction {f:g}: {init}")
                    start = {"pretrained_ckpt": str(weights[variant.pretrain])} if variant.pretrain else {}
                    before = 0.0
                    if variant.continues:
                        first, key = variant.continues
                        first_run = json.loads((seed_dir / f"f{f:g}" / first / "run.json").read_text())
                        start[key] = str(seed_dir / f"f{f:g}" / first / "model.pt")
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
    results["summary"] = summarise(results["runs"], fractions, spec.inits, regions)
    if spec.reference:
        results["reference"] = {"init": spec.reference[0], "fraction": spec.reference[1]}
        results["ratio_to_reference"] = ratios_to_reference(results["runs"], *spec.reference, regions)
    # a resumed call that trains little must not report its own small footprint as the benchmark's
    results["peak_rss_mb"] = max(_peak_rss_mb(), earlier_peak or 0.0)
    atomic_write_json(results, out_dir / "results.json")
    atomic_write_text(results_markdown(results, regions), out_dir / "results.md")
    plot_label_efficiency(results, out_dir / "label_efficiency.png")
    return results


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stats(values):
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))


EXTRA_METRICS = {"precision": "precision", "mean_miou": "mIoU", "under_segmentation": "under-seg.",
                 "over_segmentation": "over-seg.", "false_positive_rate": "FP rate (tumour-free)"}
# metrics a run record keeps besides Dice and HD95, where the bundle's evaluation reports them
RUN_METRICS = ("precision", "mean_iou", "mean_miou", "under_segmentation", "over_segmentation", "false_positive_rate")


def summarise(runs: list[dict], fractions, inits, regions) -> list[dict]:
    rows = []
    for f in fractions:
        for init in inits:
            sel = [r for r in runs if r["fraction"] == f and r["init"] == init]
            if not sel:
                continue
            m, s = _stats([r["mean_dice"] for r in sel])
            row = {"fraction": f, "init": init, "n_seeds": len(sel), "mean_dice": round(m, 4), "std_dice": round(s, 4),
                   "dice": {g: round(_stats([r["dice"][g] for r in sel])[0], 4) for g in regions},
                   "mean_hd95": round(_stats([r.get("mean_hd95") for r in sel])[0], 2),
                   "train_seconds": round(_stats([r["train_seconds"] for r in sel])[0], 1),
                   "labelled_cases": sel[0].get("labelled_cases")}
            if len(regions) > 1 and all(isinstance(r.get("hd95"), dict) for r in sel):  # per-region HD95
                row["hd95"] = {g: round(_stats([r["hd95"].get(g) for r in sel])[0], 2) for g in regions}
            for key in EXTRA_METRICS:  # the paper's other metrics, where the bundle's evaluation reports them
                if all(key in r for r in sel):
                    row[key] = round(_stats([r[key] for r in sel])[0], 4)
            rows.append(row)
    return rows


def ratios_to_reference(runs: list[dict], ref_init: str, ref_fraction: float, regions) -> list[dict]:
    """Per (fraction, variant): mean over seeds of Dice / the reference run's Dice (same seed), per region."""
    ref = {r["seed"]: r for r in runs if r["init"] == ref_init and r["fraction"] == ref_fraction}
    groups: dict = {}
    for r in runs:
        if r["seed"] in ref:
            groups.setdefault((r["fraction"], r["init"]), []).append(r)
    rows = []
    for (f, init), sel in sorted(groups.items(), key=lambda kv: kv[0][0]):
        row = {"fraction": f, "init": init, "n_seeds": len(sel)}
        for g in regions:
            m, s = _stats([r["dice"][g] / ref[r["seed"]]["dice"][g] for r in sel if ref[r["seed"]]["dice"][g] > 0])
            row[g] = {"ratio": round(m, 4), "std": round(s, 4)}
        rows.append(row)
    return rows


def results_markdown(results: dict, regions) -> str:
    rows = results["summary"]
    lines = [f"# {results['bundle']} on {results['dataset']} (budget: {results['budget']}, "
             f"seeds {', '.join(map(str, results['seeds']))})", "",
             "Mean over seeds (± std) of the test-set Dice; HD95 in voxels/pixels. `method` = the bundle's "
             "method, `baseline` = its from-scratch baseline; other rows are the comparisons and ablations "
             "named in the bundle's docs.", ""]
    if results.get("split"):
        lines += [f"Split: {', '.join(f'{k} {v:g}' for k, v in results['split'].items())} of the cases.", ""]
    extra = [k for k in EXTRA_METRICS if rows and all(k in r for r in rows)]
    hd_regions = list(regions) if rows and all("hd95" in r for r in rows) else []
    lines += ["| fraction | labelled cases | init | mean Dice | " + " | ".join(f"{g} Dice" for g in regions)
              + "".join(f" | {EXTRA_METRICS[k]}" for k in extra) + " | mean HD95 | "
              + "".join(f"{g} HD95 | " for g in hd_regions) + "train s |",
              "|" + "---|" * (6 + len(regions) + len(extra) + len(hd_regions))]
    for r in rows:
        lines.append(f"| {r['fraction']:g} | {r['labelled_cases']} | {r['init']} | {r['mean_dice']:.3f} ± {r['std_dice']:.3f} | "
                     + " | ".join(f"{r['dice'][g]:.3f}" for g in regions)
                     + "".join(f" | {r[k]:.3f}" for k in extra)
                     + f" | {r['mean_hd95']:.1f} | " + "".join(f"{r['hd95'][g]:.1f} | " for g in hd_regions)
                     + f"{r['train_seconds']:.0f} |")
    lines.append("")
    for f in results["fractions"]:
        by = {r["init"]: r for r in rows if r["fraction"] == f}
        if "baseline" not in by:
            continue
        for init, row in by.items():
            if init == "baseline":
                continue
            d = row["mean_dice"] - by["baseline"]["mean_dice"]
            wins = sum(1 for s in results["seeds"] if _seed_delta(results["runs"], f, s, init) > 0)
            verdict = "beat" if d > 0 else "did not beat"
            lines.append(f"- fraction {f:g}: `{init}` {verdict} the baseline ({d:+.3f} mean Dice; "
                         f"better in {wins} of {len(results['seeds'])} seeds).")
    if results.get("ratio_to_reference"):
        ref = results["reference"]
        lines += ["", f"Dice as a fraction of `{ref['init']}` at fraction {ref['fraction']:g} (same seed; mean ± std "
                  "over seeds):", "", "| fraction | init | " + " | ".join(regions) + " |", "|" + "---|" * (2 + len(regions))]
        for r in results["ratio_to_reference"]:
            lines.append(f"| {r['fraction']:g} | {r['init']} | "
                         + " | ".join(f"{r[g]['ratio']:.3f} ± {r[g]['std']:.3f}" for g in regions) + " |")
    return "\n".join(lines) + "\n"


def _seed_delta(runs, f, seed, init="method") -> float:
    by = {r["init"]: r["mean_dice"] for r in runs if r["fraction"] == f and r["seed"] == seed}
    return by.get(init, float("nan")) - by.get("baseline", float("nan"))


def plot_label_efficiency(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for init in dict.fromkeys(r["init"] for r in results["summary"]):
        rows = sorted((r for r in results["summary"] if r["init"] == init), key=lambda r: r["fraction"])
        x = [r["fraction"] for r in rows]
        ax.errorbar(x, [r["mean_dice"] for r in rows], yerr=[r["std_dice"] for r in rows], marker="o", capsize=3,
                    label=init)
    ax.set_xscale("log")
    ax.set_xticks(results["fractions"], [f"{f:g}" for f in results["fractions"]])
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("mean test Dice (± std over seeds)")
    ax.set_title(f"{results['bundle']} on {results['dataset']} ({results['budget']} budget)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
