"""The ``medssl`` command (python-fire).

    medssl bundles
    medssl run BUNDLE STAGE [--key value ...]
    medssl data download brats18-sample [--out DIR]
    medssl data prepare SRC OUT
    medssl data split DIR --out FILE [--label_fraction 0.1] [--seed 0] [--val_fraction 0.15] [--test_fraction 0.3] [--label_unit slice]
    medssl data check DIR
    medssl benchmark BUNDLE --data_dir DIR --fractions 0.1,0.2,1.0 --folds 5 --seed 0 --budget small --out DIR
    medssl label serve --studies DIR [--bundles a,b] [--port 8000] [--weights name=RUN_DIR,...]
    medssl label install APP_DIR [--bundles a,b] [--weights name=RUN_DIR,...]
    medssl zoo package BUNDLE --weights RUN_DIR --out DIR [--base_url URL] [--max_file_mb 25]
    medssl zoo verify PATH
    medssl zoo index DIR [--base_url URL]
    medssl zoo install NAME --zoo URL_OR_DIR --bundle_dir DIR [--version V] [--force]
"""

import json
import sys
from pathlib import Path

import fire


class Data:
    """Data sets: download, prepare, split, check."""

    def download(self, name: str = "brats18-sample", out: str = "", prepare: bool = True):
        """Fetch the public BraTS 2018 sample (1 mm, SHA-256 verified) and prepare its 2 mm copy.

        Args:
            name: the data set; only 'brats18-sample'.
            out: folder to put it in (default: where medssl looks for data, $MEDSSL_DATA_DIR).
            prepare: also write the 2 mm copy (brats18_2mm) the bundles use.
        """
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
        """Crop BraTS cases to the brain (+margin voxels) and resample to pixdim mm.

        Args:
            src: folder of BraTS case folders (<case>/<case>_{flair,t1,t1ce,t2}.nii.gz, seg optional).
            out: folder for the prepared cases.
            pixdim: output voxel size in mm.
            margin: voxels kept around the brain's bounding box.
        """
        from .data import prepare

        return [str(p) for p in prepare(src, out, pixdim, margin)]

    def split(self, data_dir: str, out: str, label_fraction: float = 1.0, seed: int = 0, val_fraction: float = 0.15,
              test_fraction: float = 0.3, label_unit: str = "case"):
        """Write an MSD-style datalist JSON (training with labelled flags / validation / test).

        Cases without a segmentation (no <case>_seg file; no labels/<id>.png) are unlabelled: they all go to
        training as "labelled": false (pretraining and semi-supervised training use them); validation and
        test hold labelled cases only.

        Args:
            data_dir: the data set folder (BraTS case folders or images/ + labels/).
            out: the datalist JSON to write.
            label_fraction: share of the labelled training cases whose labels are used (0 < f <= 1).
            seed: fixes the split.
            val_fraction: share of the labelled cases held out for validation.
            test_fraction: share of the labelled cases held out for testing.
            label_unit: 'case' (default: label_fraction of the training cases are labelled, whole volumes) or
                'slice' (BraTS volumes for 2D slice networks, dfr_barlow: label_fraction of the brain-showing
                axial slices of ALL training volumes are labelled, as "labelled_slices" per volume; the three
                sets are the same as with 'case').
        """
        from .data import LAYOUTS, detect_layout, label_slices, make_split, write_datalist

        if label_unit not in ("case", "slice"):
            raise ValueError(f"label_unit must be 'case' or 'slice', got {label_unit!r}")
        cases = LAYOUTS[detect_layout(data_dir)](data_dir)
        split = make_split(cases, label_fraction, seed, val_fraction, test_fraction)
        if label_unit == "slice":
            split = label_slices(split, label_fraction, seed)
        write_datalist(split, out, data_dir)
        n_lab = sum(c["labelled"] for c in split["training"])
        n_none = sum("label" not in c for c in split["training"])
        n_slices = sum(len(c.get("labelled_slices", [])) for c in split["training"])
        slices = f", {n_slices} labelled slices" if label_unit == "slice" else ""
        return (f"{out}: {len(split['training'])} training ({n_lab} labelled{slices}, {n_none} without a label), "
                f"{len(split['validation'])} validation, {len(split['test'])} test")

    def check(self, data_dir: str, layout: str = ""):
        """Validate every file of a data directory; report every problem in one pass (exit 1 if any). A case
        without a segmentation is not a problem: it is an unlabelled case (counted in the report).

        Args:
            data_dir: the data set folder.
            layout: 'brats' or 'nuclei' (default: detected from the folder).
        """
        from .data import LAYOUTS, check_dataset_dir, detect_layout

        problems = check_dataset_dir(data_dir, layout or None)
        if problems:
            print(f"{data_dir}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            raise SystemExit(1)
        cases = LAYOUTS[layout or detect_layout(data_dir)](data_dir)
        n_lab = sum("label" in c for c in cases)
        return f"{data_dir}: OK, {len(cases)} cases ({n_lab} labelled, {len(cases) - n_lab} without a label)"


class Label:
    """MONAI Label: serve the bundles to 3D Slicer / OHIF (needs the label extra)."""

    def serve(self, studies: str, bundles: str = "", port: int = 8000, weights: str = "", out: str = "",
              dryrun: bool = False):
        """Start a MONAI Label server (127.0.0.1:PORT) whose models are the bundles.

        Args:
            studies: a MONAI Label studies folder (images at the top, labels/final/), or a data folder in the
                BraTS layout (<case>/<case>_<modality>.nii.gz; each case becomes one 4-channel NIfTI study) or
                the nuclei layout (images/, labels/), prepared into --out without touching the originals.
            bundles: comma-separated bundles to serve (default all; those that cannot serve the studies are
                listed as not served, with the reason, in the log and in GET /info/).
            port: the server's port.
            weights: comma-separated name=RUN_DIR: a trained run's folder (model.pt and run.json, whose settings
                are applied so the served network matches) or a model file; default the bundle's models/model.pt.
            out: where prepared studies and the served bundle folders go (default ~/.cache/medssl/label/<name>).
            dryrun: prepare everything and print the server command without starting it.
        """
        from . import label

        _need_monailabel()
        try:
            cmd = label.serve_command(studies, bundles=bundles, port=port, weights=weights, out=out)
        except (ValueError, FileNotFoundError) as e:
            print(f"medssl label serve: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(" ".join(cmd), file=sys.stderr)
        if dryrun:
            return " ".join(cmd)
        from .label.server import run_server

        raise SystemExit(run_server(cmd, f"http://127.0.0.1:{port}"))

    def install(self, app_dir: str, bundles: str = "", weights: str = "", kind: str = "brats"):
        """Copy the bundles (configs, docs, LICENSE, weights where given) into APP_DIR/model/<name>, for a stock
        MONAI Label monaibundle app (start it with --conf models <name>,...).

        Args:
            app_dir: the MONAI Label app folder (e.g. from `monailabel apps --download --name monaibundle`).
            bundles: comma-separated bundles (default all).
            weights: comma-separated name=RUN_DIR (a trained run's folder or a model file).
            kind: the studies the app will serve: brats (4-channel NIfTI volumes) or nuclei (PNG).
        """
        from . import label

        _need_monailabel()
        if kind not in ("brats", "nuclei"):
            print(f"medssl label install: kind {kind!r}; expected 'brats' or 'nuclei'", file=sys.stderr)
            raise SystemExit(2)
        try:
            record = label.materialise_bundles(label.parse_bundles(bundles), Path(app_dir) / "model", kind,
                                               label.parse_weights(weights))
        except (ValueError, FileNotFoundError) as e:
            print(f"medssl label install: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        for name, r in record.items():
            print(f"{name:24s} {'ready' if r['served'] else 'copied, not servable: ' + r['reason']}")
        return None


class Zoo:
    """Bundle zoo (the MONAI model zoo's layout): package, verify, index, install."""

    def package(self, bundle: str, weights: str = "", out: str = "zoo", base_url: str = "", max_file_mb: float = 25.0):
        """Package a bundle with a trained run's weights: OUT/BUNDLE/ (configs, docs, LICENSE, models/model.pt,
        models/model.ts from MONAI's ckpt_export, large_files.yml with each weight's URL and SHA-256) and
        OUT/BUNDLE_v<version>.zip (files over --max_file_mb stay out of the zip; install fetches them).

        Args:
            bundle: a bundle name (`medssl bundles` lists them).
            weights: a trained run's folder (model.pt and run.json; semi_cml: model_<modality>.pt too). The
                settings it was trained with that inference.json has are written into the packaged inference.json.
            out: the zoo folder.
            base_url: where OUT will be served (large_files.yml's URLs; default OUT's file:// URI).
            max_file_mb: files larger than this are left out of the zip (the model zoo's limit: 25).
        """
        from .zoo import ZooError, package

        if not weights:
            _zoo_refuse("package", "--weights RUN_DIR is required (a trained run's folder with model.pt)")
        try:
            z = package(bundle, out, weights, base_url=base_url, max_file_mb=max_file_mb)
        except (ZooError, ValueError, FileNotFoundError) as e:
            _zoo_refuse("package", e)
        print(z)

    def verify(self, path: str, max_file_mb: float = 25.0):
        """The model zoo CI's checks on a packaged bundle folder, one line each; exit 1 if any fails: large files
        (fetched where absent, hashes checked), required files, version in the changelog, metadata against the
        shipped schema (offline; monai_version, network_data_format), file sizes, verify_net_in_out (n=1),
        ckpt_export (and models/model.ts gives its output), MONAI's inference properties, monai.bundle.load.

        Args:
            path: the bundle folder (e.g. OUT/BUNDLE from package, or an installed bundle).
            max_file_mb: the size limit for a file not listed in large_files.yml.
        """
        from .zoo import verify

        checks = verify(path, max_file_mb=max_file_mb)
        for c in checks:
            print(c.line())
        if not all(c.ok for c in checks):
            raise SystemExit(1)

    def index(self, zoo_dir: str, base_url: str = ""):
        """Write ZOO_DIR/model_info.json (the model zoo's format) for its <name>_v<version>.zip files, so that
        `medssl zoo install`, MONAI's `download` and `get_all_bundles_list` read it.

        Args:
            zoo_dir: the folder of packaged zips.
            base_url: the URL ZOO_DIR is served at (sources become absolute URLs; default relative names).
        """
        from .zoo import ZooError, index

        try:
            print(index(zoo_dir, base_url=base_url))
        except ZooError as e:
            _zoo_refuse("index", e)

    def install(self, name: str, zoo: str = "", bundle_dir: str = "", version: str = "", force: bool = False):
        """Install a bundle from a zoo: download its zip, check its checksum and paths, unpack, fetch and check
        its large files, check its files and metadata; all in a temporary folder renamed into place at the end.

        Args:
            name: the bundle name.
            zoo: the zoo (a folder or URL holding model_info.json, or model_info.json itself).
            bundle_dir: where the bundle folder goes (BUNDLE_DIR/NAME).
            version: a version (default the latest).
            force: replace an installed copy.
        """
        from .zoo import ZooError, install

        if not zoo or not bundle_dir:
            _zoo_refuse("install", "--zoo URL_OR_DIR and --bundle_dir DIR are required")
        try:
            print(install(name, zoo, bundle_dir, version=version, force=force))
        except ZooError as e:
            _zoo_refuse("install", e)


def _zoo_refuse(command: str, message) -> None:
    print(f"medssl zoo {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _need_monailabel():
    from .label import INSTALL_HINT, monailabel_available

    if not monailabel_available():
        print(f"medssl label: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)


class CLI:
    """medssl: label-efficient segmentation methods as MONAI Bundles."""

    def __init__(self):
        self.data = Data()
        self.label = Label()
        self.zoo = Zoo()

    def bundles(self):
        """List the shipped bundles: name, paper, paradigm, stages."""
        from .bundles import list_bundles

        for b in list_bundles():
            print(f"{b['name']:24s} {b['paradigm']:32s} stages: {', '.join(b['stages'])}\n{'':24s} {b['paper']}")

    def run(self, bundle: str, stage: str, **overrides):
        """Run one stage of a bundle (same as python -m monai.bundle run --config_file ...); any config id
        can be set with --id value. `medssl run BUNDLE STAGE --help` lists the stage's settings.

        Bad input (data, checkpoints, a setting of the wrong kind) stops with one line and exit code 2.
        evaluate and inference with --ckpt_dir RUN take the settings RUN was trained with from RUN/run.json
        (network sizes and switches, the datalist); a setting given here wins.

        Args:
            bundle: a bundle name (`medssl bundles` lists them).
            stage: pretrain, train, prel, evaluate, inference or multi_gpu_train (those the bundle has).
            overrides: --id value for any config id, e.g. --label_fraction 0.1 --seed 1.
        """
        from .bundles import bundle_path, bundle_stages, check_overrides, recorded_settings, run_stage

        try:
            stages = bundle_stages(bundle_path(bundle))
        except ValueError as e:  # no such bundle: one line naming the bundles there are
            print(f"medssl run: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if stage not in stages:
            print(f"medssl run: bundle {bundle!r} has no stage {stage!r}; expected one of {stages}", file=sys.stderr)
            raise SystemExit(2)
        try:
            overrides = check_overrides(bundle, stage, overrides)
            if stage in ("evaluate", "inference") and overrides.get("ckpt_dir"):
                recorded = {k: v for k, v in recorded_settings(bundle, stage, overrides["ckpt_dir"]).items()
                            if k not in overrides}
                if recorded:
                    print(f"medssl run {bundle} {stage}: as trained ({Path(overrides['ckpt_dir'], 'run.json')}): "
                          + " ".join(f"--{k} {json.dumps(v)}" for k, v in recorded.items()), file=sys.stderr)
                overrides = {**recorded, **overrides}
            run_stage(bundle, stage, **overrides)
        except Exception as e:
            cause = _input_error(e)
            if cause is None:
                raise
            print(f"medssl run {bundle} {stage}: {type(cause).__name__}: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    def benchmark(self, bundle: str, data_dir: str = "", fractions: str = "0.1,0.2,1.0", folds: int = 0,
                  seed: int = 0, budget: str = "small", out: str = "benchmark_out", variants: str = "",
                  reevaluate: bool = False, workers: int = 1, figures: int = 0, pretrained_from: str = ""):
        """Method vs baseline (and the bundle's other variants, bundles/BUNDLE/benchmark.json) at each label
        fraction, by k-fold cross-validation: every case is tested once; variants are compared with the
        baseline case by case (paired bootstrap). Writes results.json/.md and plots to --out; an
        interrupted call resumes.

        Args:
            bundle: a bundle name (`medssl bundles` lists them).
            data_dir: the data set (default: the bundle's under $MEDSSL_DATA_DIR, or ../shared/data beside a
                checkout; the public BraTS sample is downloaded where it is absent).
            fractions: comma-separated label fractions.
            folds: k of the cross-validation (0: the bundle's benchmark.json's).
            seed: fixes the fold assignment.
            budget: a budget of the bundle's benchmark.json (converged, small, smoke, full).
            out: the output folder (also the resume state).
            variants: comma-separated variants to train now (default all); finished runs of others are reported.
            reevaluate: re-run only the evaluation of the finished runs (models and training times kept).
            workers: runs trained at once in separate processes (a GPU or many-core machine).
            figures: PNGs of this many test cases per fold and fraction, method above baseline, in
                --out/figures (each evaluation's --save_figures; runs finished before need --reevaluate).
            pretrained_from: another benchmark's --out whose finished pretrainings are the same as this call's
                (same settings and fold cases, e.g. a budget that only fine-tunes longer): copied, not repeated.
        """
        from .apps.benchmark import run_benchmark
        run_benchmark(bundle, _benchmark_data(bundle, data_dir), fractions, folds=folds or None, seed=seed, budget=budget,
                      out=out, variants=variants or None, reevaluate=reevaluate, workers=workers,
                      figures=figures, pretrained_from=pretrained_from or None)
        print(Path(out, "results.md").read_text())

    def sweep(self, bundle: str, name: str = "pretraining_length", data_dir: str = "",
              budget: str = "converged", out: str = "sweep_out"):
        """A sweep of the bundle's benchmark (bundles/BUNDLE/benchmark.json "sweeps"), e.g. the fine-tuned
        Dice at one label fraction on one fold against the pretraining length (0 = from scratch).
        Writes sweep.json and sweep.png to --out; resumable.

        Args:
            bundle: a bundle name.
            name: a sweep of its benchmark.json.
            data_dir: the data set (default as for benchmark).
            budget: the budget the sweep's runs use.
            out: the output folder (also the resume state).
        """
        from .apps.benchmark import run_sweep

        result = run_sweep(bundle, _benchmark_data(bundle, data_dir), name, budget=budget, out=out)
        print("\n".join(sweep_lines(result)))


def sweep_lines(result: dict) -> list[str]:
    """One summary line per swept value of a :func:`medssl.apps.benchmark.run_sweep` result: the pretraining
    length's test Dice, or a config id's value with its Dice (mean over the folds) and report metrics on the split
    it was scored on."""
    if "override" not in result:
        return [f"pretraining steps {r['pretrain_steps']:>6}: test mean Dice {r['mean_dice']:.3f} ({r['variant']})"
                for r in result["rows"]]
    lines = []
    for row in result["summary"]:
        extra = ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                          if k not in ("value", "n_folds", "mean_dice") and isinstance(v, (int, float)))
        lines.append(f"{result['override']} {row['value']!s:>6}: {result.get('split', 'test')} mean Dice "
                     f"{row['mean_dice']:.3f} over {row['n_folds']} fold(s)" + (f"; {extra}" if extra else ""))
    return lines


def _benchmark_data(bundle: str, data_dir: str | None) -> str:
    """``data_dir``, or else the bundle's benchmark data set under $MEDSSL_DATA_DIR (the public sample is
    downloaded and prepared first where it is absent)."""
    from .apps.benchmark import BENCHMARKS
    from .data import ensure_sample
    from .utils import data_root

    if data_dir:
        return data_dir
    if bundle not in BENCHMARKS:
        raise SystemExit(f"no benchmark defined for {bundle!r}; expected one of {sorted(BENCHMARKS)}")
    return str(ensure_sample(data_root(), BENCHMARKS[bundle].dataset))


def _input_error(e: BaseException):
    """The medssl bad-input error behind MONAI's 'Failed to evaluate' wrappers, if any."""
    from .bundles import SettingError
    from .data import DataError, DownloadError
    from .engines import NonFiniteLossError, SettingsMismatchError
    from .networks import CheckpointMismatchError

    while e is not None:
        if isinstance(e, (DataError, CheckpointMismatchError, NonFiniteLossError, SettingsMismatchError, SettingError,
                          DownloadError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _stage_help(argv: list) -> str | None:
    """The help of ``medssl run [BUNDLE [STAGE]] --help`` (fire cannot list a stage's config ids), else None."""
    from .bundles import bundle_path, bundle_stages, list_bundles, stage_settings

    words = [a for a in argv if a not in ("--help", "-h", "--")]
    if argv[:1] != ["run"] or len(words) == len(argv) or len(words) > 3:
        return None
    if len(words) < 3:
        rows = [f"  {b['name']:24s} {', '.join(b['stages'])}" for b in list_bundles()]
        return ("usage: medssl run BUNDLE STAGE [--id value ...]   (medssl run BUNDLE STAGE --help: its settings)\n"
                "Runs one stage as python -m monai.bundle run does. Bundles and their stages:\n" + "\n".join(rows))
    bundle, stage = words[1], words[2]
    if stage not in bundle_stages(bundle_path(bundle)):
        raise ValueError(f"bundle {bundle!r} has no stage {stage!r}; expected one of {bundle_stages(bundle_path(bundle))}")
    rows = [f"  --{k} {json.dumps(v)}" for k, v in stage_settings(bundle, stage).items()]
    return (f"usage: medssl run {bundle} {stage} [--id value ...]\nSettings (id and default; any other config id of "
            f"bundles/{bundle}/configs can be set too):\n" + "\n".join(rows))


RESUMABLE = ("benchmark", "sweep", "run")  # commands whose interrupted work the same command resumes


def unknown_options(argv: list, root=None) -> str | None:
    """One line naming the first ``--option`` that the command ``argv`` names (``medssl benchmark ...``,
    ``medssl zoo package ...``) does not take, with the nearest it does; None when every option is known, or the
    command takes any (``run``'s config ids) or is not found (fire reports that). Fire itself would run the
    command and only then fail on the left-over option (an hour of benchmark, then exit 2)."""
    import difflib
    import inspect

    target, words = root if root is not None else CLI(), list(argv)
    while words and not words[0].startswith("-") and hasattr(target, words[0]) and not words[0].startswith("_"):
        target, words = getattr(target, words[0]), words[1:]
        if inspect.ismethod(target) or inspect.isfunction(target):
            break
    if not callable(target) or inspect.isclass(target):
        return None
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    known = {n.replace("_", "-") for n in params} | set(params)
    for w in words[: words.index("--")] if "--" in words else words:
        if not w.startswith("--") or w in ("--help", "--helpfull"):
            continue
        name = w[2:].split("=", 1)[0]
        if name in known or (name.startswith("no") and name[2:] in known):
            continue
        near = difflib.get_close_matches(name, sorted(params), n=1)
        return (f"unknown option --{name} for {target.__name__}; expected one of "
                + ", ".join(f"--{n}" for n in params) + (f" (did you mean --{near[0]}?)" if near else ""))
    return None


def main():
    import logging

    try:
        text = _stage_help(sys.argv[1:])
    except ValueError as e:
        print(f"medssl run: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    unknown = unknown_options(sys.argv[1:])
    if unknown:
        print(f"medssl: {unknown}", file=sys.stderr)
        raise SystemExit(2)
    if text is not None:
        print(text)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        fire.Fire(CLI(), name="medssl")
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of whatever was running
        command = " ".join(sys.argv[1:3]) or "medssl"
        again = (" run the same command again to resume it (finished runs and epochs are kept)"
                 if sys.argv[1:2] and sys.argv[1] in RESUMABLE else "")
        print(f"medssl {command}: interrupted;{again or ' nothing is left half-written'}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # medssl's bad-input errors from any command: one line, exit 2
        cause = _input_error(e)
        if cause is None:
            raise
        print(f"medssl: {type(cause).__name__}: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
