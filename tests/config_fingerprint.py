"""What a bundle stage resolves to, as plain JSON: the engines its ``run`` section starts, with their
network, loss, optimiser, data loaders, transforms, inferers and attached handlers, described
recursively by class and settings (weights and cached data left out).

``tests/test_config_equivalence.py`` compares every stage's description with the one recorded from the
configs before they were layered (issue 11), so a refactor of the JSON cannot change behaviour unseen.
Record anew (only when a change of behaviour is intended, and say so in the commit):

    MEDSSL_DATA_DIR=../shared/data python tests/config_fingerprint.py --write

``--only NAME`` (with ``--write``) records that bundle's stages anew and keeps every other recorded one.
(``--standalone`` reads each stage from its own file alone, as before issue 11; it recorded the first file.)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FINGERPRINTS = REPO / "tests" / "data" / "config_fingerprints.json.gz"
ROOT = "/medssl-bundle-root"  # bundle_root every description is taken with
SKIP_STAGES = ("multi_gpu_train",)  # needs a process group; tests/test_multi_gpu covers it under torchrun
# attributes that hold state, caches or plumbing rather than settings
SKIP_ATTRS = {"state", "logger", "_cache", "_hash_keys", "R", "_lock", "_event_handlers_called", "scaler",
              "_allowed_events", "_dataloader_iter", "_init_iter", "_internal_rng", "should_terminate",
              "should_terminate_single_epoch", "should_interrupt", "_state_dict_user_keys", "interrupt_resume_enabled",
              "last_event_name", "_process_function", "_iterator", "_start_time", "fire_event", "should_validate",
              "should_skip_validation", "_nvimgcodec_available", "_ipython_canary_method_should_not_exist_", "metric_logger", "summary_writer"}
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _run_targets(parser) -> list[str]:
    """The config ids the ``run`` section refers to (``$@train#trainer.run()`` -> ``train#trainer``)."""
    ids = []
    for expr in parser["run"]:
        ids += [m for m in re.findall(r"@([\w#:]+)", str(expr)) if m not in ids]
    return ids


class Describer:
    def __init__(self, data_root: str, bundle_root: str = ROOT):
        # the data folder as given and as resolved (it may be reached through a link)
        self.subs = [(str(bundle_root), "$ROOT"), (str(Path(data_root).resolve()), "$DATA"), (str(data_root), "$DATA")]
        self.seen: set[int] = set()

    def text(self, s: str) -> str:
        for a, b in self.subs:
            s = s.replace(a, b)
        return ADDRESS.sub("", s)

    def __call__(self, v, depth: int = 0):  # noqa: C901 - one case per kind of object
        if v is None or isinstance(v, (bool, int, float)):
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, (Path, torch.device, torch.dtype, np.dtype, type)):
            return self.text(getattr(v, "__qualname__", str(v)))
        if isinstance(v, (torch.Tensor, np.ndarray)):
            if v.size == 0 if isinstance(v, np.ndarray) else v.numel() == 0:
                return {"array": [0]}
            if (v.ndim if isinstance(v, np.ndarray) else v.dim()) <= 1 and len(v) <= 16:
                return {"array": np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v).tolist()}
            return {"array": list(v.shape), "dtype": str(v.dtype)}
        if isinstance(v, (np.generic,)):
            return v.item()
        if isinstance(v, (list, tuple)):
            return [self(x, depth + 1) for x in v]
        if isinstance(v, dict):
            return {str(k): self(x, depth + 1) for k, x in v.items() if str(k) not in SKIP_ATTRS}
        if callable(v) and hasattr(v, "__wrapped__"):  # ignite's wrapper of a handler with an event filter
            return {"wrapped": self(v.__wrapped__, depth)}
        if isinstance(v, functools.partial):
            return {"partial": self(v.func, depth + 1), "args": self(list(v.args), depth + 1),
                    "keywords": self(v.keywords, depth + 1)}
        if callable(v) and hasattr(v, "__self__") and hasattr(v, "__func__"):  # bound method
            return {"method": v.__func__.__qualname__, "of": self(v.__self__, depth + 1)}
        if callable(v) and hasattr(v, "__qualname__") and not isinstance(v, torch.nn.Module):
            return {"function": f"{getattr(v, '__module__', '')}.{v.__qualname__}"}
        if depth > 12:
            return {"class": type(v).__qualname__, "depth": "cut"}
        if id(v) in self.seen:
            return {"class": type(v).__qualname__, "ref": "seen"}
        self.seen.add(id(v))
        if isinstance(v, np.random.RandomState) or isinstance(v, torch.Generator):
            return {"class": type(v).__qualname__}
        if isinstance(v, torch.nn.Module):
            return {"module": self.text(repr(v)), "parameters": sum(p.numel() for p in v.parameters())}
        if isinstance(v, torch.optim.Optimizer):
            return {"optimizer": type(v).__qualname__, "defaults": self(v.defaults, depth + 1),
                    "groups": [sum(p.numel() for p in g["params"]) for g in v.param_groups]}
        if isinstance(v, torch.utils.data.Dataset) and hasattr(v, "data"):
            data = v.data
            digest = hashlib.sha256(self.text(json.dumps(data, sort_keys=True, default=str)).encode()).hexdigest()
            return {"dataset": type(v).__qualname__, "length": len(data), "data_sha256": digest[:16],
                    "transform": self(getattr(v, "transform", None), depth + 1),
                    **{k: self(getattr(v, k), depth + 1) for k in ("cache_rate", "copy_cache") if hasattr(v, k)}}
        if isinstance(v, torch.utils.data.DataLoader):
            return {"loader": type(v).__qualname__, "batch_size": v.batch_size, "drop_last": v.drop_last,
                    "num_workers": v.num_workers, "sampler": type(v.sampler).__qualname__,
                    "collate_fn": self(v.collate_fn, depth + 1), "dataset": self(v.dataset, depth + 1)}
        from ignite.engine import Engine

        attrs = {k: x for k, x in vars(v).items() if k not in SKIP_ATTRS} if hasattr(v, "__dict__") else {}
        out = {"class": f"{type(v).__module__}.{type(v).__qualname__}"}
        if isinstance(v, Engine):
            handlers = attrs.pop("_event_handlers", {})
            out["handlers"] = {self.text(str(e)): [self(h[0], depth + 1) for h in hs] for e, hs in sorted(
                handlers.items(), key=lambda kv: str(kv[0])) if hs}
        for k in sorted(attrs):
            out[k] = self(attrs[k], depth + 1)
        return out


def describe_stage(bundle: str, stage: str, data_root: str, files=None, overrides=None) -> dict:
    """The JSON description of what ``run`` starts for one stage, parsed as ``medssl run`` parses it
    (``files``: the config files to layer, default the bundle contract's list for the stage)."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from medssl.bundles import bundle_path

    root = bundle_path(bundle)
    if files is None:
        from medssl.bundles import stage_config_files

        files = stage_config_files(root, stage)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = ROOT
    for k, v in (overrides or {}).items():
        parser[k] = v
    set_determinism(seed=0)
    describe = Describer(data_root)
    out = {}
    from unittest import mock

    from monai.data import CacheDataset

    # no weights are read, no data is cached and no file is validated (664 DSB images per dfr_barlow stage were
    # most of the time): the description is of settings, not of contents
    keep = lambda net, *a, **k: net  # noqa: E731
    with mock.patch("medssl.networks.weights.load_pretrained", keep), mock.patch("medssl.networks.load_pretrained", keep), \
            mock.patch.object(CacheDataset, "_fill_cache", lambda self, *a, **k: []), \
            mock.patch("medssl.data.split.check_cases", lambda *a, **k: None):
        for target in _run_targets(parser):
            out[target] = describe(parser.get_parsed_content(target))
    return out


def stage_cases(bundle: str, stages) -> dict:
    """``{"stage" or "stage[variant]": (stage, overrides)}``: every stage with its defaults, and the
    stages each benchmark variant and pretraining of ``medssl benchmark`` runs, with their overrides (and
    per data layout, where the benchmark has layout overrides)."""
    from medssl.apps.benchmark import BENCHMARKS

    cases = {s: (s, {}) for s in stages}
    spec = BENCHMARKS.get(bundle)
    if spec is None:
        return cases
    for name, over in spec.pretrainings.items():
        if "pretrain" in stages:
            cases[f"pretrain[{name}]"] = ("pretrain", dict(over))
    for name, v in spec.variants.items():
        for stage in filter(None, {v.stage, "evaluate"}):
            cases[f"{stage}[{name}]"] = (stage, dict(v.train))
    for layout, entry in spec.layouts.items():
        for key, (stage, over) in list(cases.items()):
            if entry.get("overrides"):
                cases[f"{key}[{layout}]"] = (stage, {**over, **entry["overrides"]})
    return cases


def describe_all(data_root: str, standalone: bool = False, only: str | None = None) -> dict:
    """Every stage of every bundle (``only``: of that bundle); ``standalone``: each stage from its own file alone
    (the layout before issue 11, used once to record the fingerprints)."""
    from medssl.bundles import bundle_path, bundle_stages, list_bundles

    def files(name, stage):
        return [bundle_path(name) / "configs" / f"{stage}.json"] if standalone else None

    out = {}
    for b in list_bundles():
        if only and b["name"] != only:
            continue
        stages = [s for s in bundle_stages(bundle_path(b["name"])) if s not in SKIP_STAGES]
        for key, (stage, over) in stage_cases(b["name"], stages).items():
            out[f"{b['name']}/{key}"] = describe_stage(b["name"], stage, data_root, files(b["name"], stage), over)
    return out


def main(argv=None):
    import os
    import subprocess

    argv = sys.argv[1:] if argv is None else argv
    data_root = os.environ.get("MEDSSL_DATA_DIR", str((REPO / ".." / "shared" / "data").resolve()))
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    desc = describe_all(data_root, standalone="--standalone" in argv, only=only)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if only and "--write" in argv:  # the other bundles' records kept as they are
        with gzip.open(FINGERPRINTS, "rt") as f:
            recorded = json.load(f)["stages"]
        desc = {**{k: v for k, v in recorded.items() if not k.startswith(f"{only}/")}, **desc}
    if "--write" in argv:
        FINGERPRINTS.parent.mkdir(exist_ok=True)
        with gzip.open(FINGERPRINTS, "wt") as f:
            json.dump({"recorded_at_commit": commit, "stages": desc}, f, indent=1, sort_keys=True)
        print(f"wrote {FINGERPRINTS}: {len(desc)} stages")
    else:
        print(json.dumps(desc, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
