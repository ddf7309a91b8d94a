"""The ``medssl`` command (python-fire).

    medssl bundles
    medssl run BUNDLE STAGE [--key value ...]
    medssl data download brats18-sample [--out DIR]
    medssl data prepare SRC OUT
    medssl data split DIR --out FILE [--label_fraction 0.1] [--seed 0] [--val_fraction 0.15] [--test_fraction 0.3]
    medssl data check DIR
    medssl benchmark BUNDLE --data_dir DIR --fractions 0.1,0.2,1.0 --folds 5 --seed 0 --budget small --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire


class Data:
    """Data sets: download, prepare, split, check."""

    def download(self, name: str = "brats18-sample", out: str | None = None, prepare: bool = True):
        """Fetch the public BraTS 2018 sample (1 mm, SHA-256 verified) and prepare its 2 mm copy."""
        from .data import download, prepare as prep
        from .utils import data_root

        if name != "brats18-sample":
            raise SystemExit(f"unknown data set {name!r}; expected 'brats18-sample'")
        root = Path(out) if out else data_root()
        raw = download(root / "brats18_1mm")
        if prepare:
            prep(raw, root / "brats18_2mm")
        return str(root)

    def prepare(self, src: str, out: str, pixdim: float = 2.0, margin: int = 2):
        """Crop BraTS cases to the brain (+margin voxels) and resample to pixdim mm."""
        from .data import prepare

        return [str(p) for p in prepare(src, out, pixdim, margin)]

    def split(self, data_dir: str, out: str, label_fraction: float = 1.0, seed: int = 0, val_fraction: float = 0.15,
              test_fraction: float = 0.3):
        """Write an MSD-style datalist JSON (training with labelled flags / validation / test)."""
        from .data import LAYOUTS, detect_layout, make_split, write_datalist

        cases = LAYOUTS[detect_layout(data_dir)](data_dir)
        split = make_split(cases, label_fraction, seed, val_fraction, test_fraction)
        write_datalist(split, out, data_dir)
        n_lab = sum(c["labelled"] for c in split["training"])
        return (f"{out}: {len(split['training'])} training ({n_lab} labelled), {len(split['validation'])} validation, "
                f"{len(split['test'])} test")

    def check(self, data_dir: str, layout: str | None = None):
        """Validate every file of a data directory; report every problem in one pass (exit 1 if any)."""
        from .data import check_dataset_dir

        problems = check_dataset_dir(data_dir, layout)
        if problems:
            print(f"{data_dir}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            raise SystemExit(1)
        return f"{data_dir}: OK"


class CLI:
    """medssl: label-efficient segmentation methods as MONAI Bundles."""

    def __init__(self):
        self.data = Data()

    def bundles(self):
        """List the shipped bundles: name, paper, paradigm, stages."""
        from .bundles import list_bundles

        for b in list_bundles():
            print(f"{b['name']:24s} {b['paradigm']:32s} stages: {', '.join(b['stages'])}\n{'':24s} {b['paper']}")

    def run(self, bundle: str, stage: str, **overrides):
        """Run one stage of a bundle (same as python -m monai.bundle run --config_file ...).

        Bad input (data, checkpoints) stops with its one message instead of MONAI's config traceback."""
        from .bundles import run_stage

        try:
            run_stage(bundle, stage, **overrides)
        except Exception as e:
            cause = _input_error(e)
            if cause is None:
                raise
            print(f"medssl run {bundle} {stage}: {type(cause).__name__}: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    def benchmark(self, bundle: str, data_dir: str | None = None, fractions="0.1,0.2,1.0", folds: int | None = None,
                  seed: int = 0, budget: str = "small", out: str = "benchmark_out", variants=None,
                  reevaluate: bool = False, workers: int = 1):
        """Method vs baseline (and the bundle's other variants, bundles/BUNDLE/benchmark.json) at each label
        fraction, by k-fold cross-validation (--folds, default the bundle's; --seed fixes the fold
        assignment): every case is tested once; variants are compared with the baseline case by case
        (paired bootstrap). Writes results.json/.md and label_efficiency.png. --variants method,baseline
        trains only those now and still reports the other variants' runs already finished under --out;
        --reevaluate re-runs only the evaluation of their finished runs (models and training times kept).
        --workers N trains N folds at once in separate processes (a GPU or many-core machine).

        Without --data_dir it uses $MEDSSL_DATA_DIR/<dataset>, downloading and preparing the public
        sample first where it is absent."""
        from .apps.benchmark import run_benchmark
        run_benchmark(bundle, _benchmark_data(bundle, data_dir), fractions, folds=folds, seed=seed, budget=budget,
                      out=out, variants=variants, reevaluate=reevaluate, workers=workers)
        print(Path(out, "results.md").read_text())

    def sweep(self, bundle: str, name: str = "pretraining_length", data_dir: str | None = None,
              budget: str = "converged", out: str = "sweep_out"):
        """A sweep of the bundle's benchmark (bundles/BUNDLE/benchmark.json "sweeps"), e.g. the fine-tuned
        Dice at one label fraction on one fold against the pretraining length (0 = from scratch).
        Writes sweep.json and sweep.png to --out; resumable."""
        from .apps.benchmark import run_sweep

        result = run_sweep(bundle, _benchmark_data(bundle, data_dir), name, budget=budget, out=out)
        for r in result["rows"]:
            print(f"pretraining steps {r['pretrain_steps']:>6}: test mean Dice {r['mean_dice']:.3f} ({r['variant']})")


def _benchmark_data(bundle: str, data_dir: str | None) -> str:
    """``data_dir``, or else the bundle's benchmark data set under $MEDSSL_DATA_DIR (the public sample is
    downloaded and prepared first where it is absent)."""
    from .apps.benchmark import BENCHMARKS
    from .data import ensure_sample
    from .utils import data_root

    if data_dir is not None:
        return data_dir
    if bundle not in BENCHMARKS:
        raise SystemExit(f"no benchmark defined for {bundle!r}; expected one of {sorted(BENCHMARKS)}")
    return str(ensure_sample(data_root(), BENCHMARKS[bundle].dataset))


def _input_error(e: BaseException):
    """The medssl bad-input error behind MONAI's 'Failed to evaluate' wrappers, if any."""
    from .data import DataError
    from .engines import NonFiniteLossError, SettingsMismatchError
    from .networks import CheckpointMismatchError

    while e is not None:
        if isinstance(e, (DataError, CheckpointMismatchError, NonFiniteLossError, SettingsMismatchError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def main():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(CLI(), name="medssl")


if __name__ == "__main__":
    main()
