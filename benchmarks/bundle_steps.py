"""Timing of a bundle's own training steps, shared by the benchmark scripts.

A bundle config (``bundles/<name>/configs/<stage>.json``) is parsed with MONAI's ``ConfigParser`` and its
``train#trainer`` (a ``SupervisedTrainer``) is run; ignite's events split every step's wall time into
*data wait* (``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``: with ``num_workers=0`` the whole
augmentation) and *compute* (``ITERATION_STARTED`` -> ``ITERATION_COMPLETED``).
"""

from __future__ import annotations

import time
from pathlib import Path

from ignite.engine import Events

import monai
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def build_trainer(bundle: str, config: str, overrides: dict):
    """``train#trainer`` of the bundle stage whose config is ``config`` (e.g. ``pretrain.json``), its
    files layered as ``python -m monai.bundle run`` layers them (an overlay over ``train.json``)."""
    from medssl.bundles import stage_config_files

    root = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(root, Path(config).stem)])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root)})
    parser.update(overrides)
    monai.utils.set_determinism(seed=overrides.get("seed", 0))
    return parser.get_parsed_content("train#trainer")


def time_steps(trainer, warmup: int) -> dict:
    """Run ``trainer`` once; per-step data wait and compute seconds (after ``warmup`` steps)."""
    marks, waits, computes = {}, [], []

    def mark(name):
        def _h(engine):
            marks[name] = time.perf_counter()
        return _h

    def done(engine):
        if engine.state.iteration > warmup:
            waits.append(marks["got"] - marks["get"])
            computes.append(time.perf_counter() - marks["start"])

    trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("get"))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("got"))
    trainer.add_event_handler(Events.ITERATION_STARTED, mark("start"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
    trainer.run()
    return {"wait": waits, "compute": computes}


def step_row(kind: str, samples: dict, inputs_per_step: int, **extra) -> dict:
    """Summary of the steps timed for one contender."""
    wait, compute = sum(samples["wait"]), sum(samples["compute"])
    n = len(samples["compute"])
    step = (wait + compute) / n
    return {"kind": kind, **extra, "steps": n, "network_inputs_per_step": inputs_per_step, "step_s": round(step, 4),
            "steps_per_s": round(1 / step, 3), "network_inputs_per_s": round(inputs_per_step / step, 2),
            "data_wait_fraction": round(wait / (wait + compute), 3)}


def data_dir(name: str) -> str:
    """``$MEDSSL_DATA_DIR/<name>``, or ``<repo>/../shared/data/<name>`` (this project's checkout)."""
    import os

    return str(Path(os.environ.get("MEDSSL_DATA_DIR") or REPO.parent / "shared" / "data") / name)


def environment() -> dict:
    """What a result was measured on."""
    import os
    import platform

    import torch

    return {"torch": torch.__version__, "monai": monai.__version__, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def write_result(result: dict, out: str | None) -> dict:
    """Write ``result`` as JSON to ``out`` (atomically) when given; returns it."""
    if out:
        from medssl.utils import atomic_write_json

        atomic_write_json(result, Path(out))
    return result
