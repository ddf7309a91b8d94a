#!/usr/bin/env python
"""Speed and memory of the dfr_barlow bundle's training steps (issue 3).

Not a test: it prints a table and optionally writes JSON. Everything is measured in ONE run, with the
bundle's own configs (``bundles/dfr_barlow/configs/{pretrain,train}.json`` parsed by MONAI's
``ConfigParser``: same data pipeline, network, loss, optimiser and ``SupervisedTrainer``), and every
ratio is taken between numbers of that run. The contenders are interleaved in ``--rounds`` rounds so
that they share the machine's background load.

Steps compared (same ``DFRUNet``, all switches on):
  * ``barlow_twins``: pretrain.json - two augmented views per image (crop, flips, rot90, contrast,
    intensity, blur, noise) + projector + ``BarlowTwinsLoss``; ``B_pre`` images x crops_per_image crops, two
    views each (the network inputs counted per step).
  * ``supervised``: train.json with ``lac_weight 0`` - a plain DiceCE step of the same network on
    ``B`` random crops (the reference).
  * ``supervised+lesion_loss``: train.json as the method fine-tunes (DiceCE + lesion-aware contrastive).

For every step the ignite events split the wall time into *data wait* (``GET_BATCH_STARTED`` ->
``GET_BATCH_COMPLETED``: time the step waits for the loader, which with ``num_workers=0`` is the whole
augmentation) and *compute* (``ITERATION_STARTED`` -> ``ITERATION_COMPLETED``). The first
``--warmup`` steps of each run are dropped. ``--num_workers`` lists the loader settings to try (the
bundle default is 0; on a GPU machine raise it so that the augmentation overlaps the step).

    python benchmarks/bench_dfr_barlow.py [--steps 12] [--rounds 2] [--num_workers 0,2]
        [--results docs/results/dfr_barlow/results.json] [--out docs/results/speed/dfr_barlow.json]

``--results`` names a ``medssl benchmark`` results file whose ``peak_rss_mb`` (the whole benchmark
run, every stage in one process) is reported beside this script's own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
from pathlib import Path

import torch

import monai

from bundle_steps import build_trainer, data_dir, step_row, time_steps, write_result

KINDS = {
    "barlow_twins": ("pretrain.json", {}),
    "supervised": ("train.json", {"init": "baseline", "lac_weight": 0.0}),
    "supervised+lesion_loss": ("train.json", {"init": "baseline"}),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=data_dir("dsb2018_nuclei"))
    ap.add_argument("--steps", type=int, default=12, help="timed steps per contender and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num_workers", default="0,2")
    ap.add_argument("--results", default=None, help="a medssl benchmark results.json (for its peak_rss_mb)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    workers = [int(w) for w in str(args.num_workers).split(",")]

    samples = {(k, w): {"wait": [], "compute": []} for k in KINDS for w in workers}
    batch = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for w in workers:
                for kind, (config, extra) in KINDS.items():
                    overrides = {"dataset_dir": args.data_dir, "ckpt_dir": f"{tmp}/{kind}_{w}_{r}",
                                 "output_dir": f"{tmp}/{kind}_{w}_{r}", "max_epochs": 1,
                                 "epoch_length": args.steps + args.warmup, "val_interval": 2,
                                 "num_workers": w, **extra}
                    trainer = build_trainer("dfr_barlow", config, overrides)
                    # images per step as the loader batches them, and the crops they make (Barlow Twins
                    # cuts crops_per_image regions from each image; each crop then gives two views)
                    first = next(iter(trainer.data_loader))
                    batch[kind] = (trainer.data_loader.batch_size, first["view1" if kind == "barlow_twins" else "image"].shape[0])
                    t = time_steps(trainer, args.warmup)
                    for key in t:
                        samples[(kind, w)][key] += t[key]
                    print(f"round {r + 1}/{args.rounds} num_workers={w} {kind}: "
                          f"{sum(t['wait']) + sum(t['compute']):.1f} s for {len(t['compute'])} steps", flush=True)

    rows = [step_row(kind, s, 2 * batch[kind][1] if kind == "barlow_twins" else batch[kind][1], num_workers=w,
                     batch_images=batch[kind][0]) for (kind, w), s in samples.items()]
    ref = {r["num_workers"]: r for r in rows if r["kind"] == "supervised"}
    for r in rows:
        r["step_time_vs_supervised"] = round(r["step_s"] / ref[r["num_workers"]]["step_s"], 2)
        r["inputs_per_s_vs_supervised"] = round(r["network_inputs_per_s"] / ref[r["num_workers"]]["network_inputs_per_s"], 2)

    result = {"torch": torch.__version__, "monai": monai.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "data_dir": args.data_dir,
              "rows": rows, "script_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if args.results:
        result["benchmark_run_peak_rss_mb"] = json.loads(Path(args.results).read_text()).get("peak_rss_mb")

    print(f"\n{'step':<24}{'workers':>8}{'batch':>7}{'inputs':>7}{'s/step':>8}{'steps/s':>8}{'inputs/s':>9}"
          f"{'data wait':>10}{'x step':>8}{'x inputs/s':>11}")
    for r in rows:
        print(f"{r['kind']:<24}{r['num_workers']:>8}{r['batch_images']:>7}{r['network_inputs_per_step']:>7}"
              f"{r['step_s']:>8.3f}{r['steps_per_s']:>8.2f}{r['network_inputs_per_s']:>9.1f}"
              f"{r['data_wait_fraction']:>10.1%}{r['step_time_vs_supervised']:>8.2f}{r['inputs_per_s_vs_supervised']:>11.2f}")
    print(f"(x step: step time / the supervised step's; x inputs/s: network inputs per second / the supervised "
          f"step's; {result['threads']} torch threads, {result['device']})")
    print(f"peak RSS of this script: {result['script_peak_rss_mb']} MB"
          + (f"; of the benchmark run ({args.results}): {result['benchmark_run_peak_rss_mb']} MB" if args.results else ""))
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
