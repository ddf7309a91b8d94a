#!/usr/bin/env python
"""Step time and peak memory of the semi_cml bundle's two-network steps (issue 5).

Not a test: it prints a table and optionally writes JSON. Every contender is the bundle's own
``train.json`` (MONAI ``SupervisedTrainer`` + the medssl iteration, see ``bundle_steps.py``) and runs in
its own child process, so that its peak resident memory (``ru_maxrss``; on a GPU also
``torch.cuda.max_memory_allocated``) is its own. Contenders alternate over ``--rounds`` rounds so that
they share the machine's background load; ratios are between numbers of this run.

  * ``supervised pair`` (``--method supervised``): the two networks stepped on labelled crops only -
    exactly two independent supervised steps, the reference;
  * ``semi-cml`` (``--method cml``): the same plus one unlabelled batch through both networks, mutual
    learning and the area-similarity contrastive loss;
  * ``mean teacher`` (``--method mean_teacher``): two students + two EMA teachers.
Batch: ``batch_size`` 1 case x 2 crops of 64^3 per stream, the bundle's defaults (``--channels`` to
change the U-Nets' widths).

    python benchmarks/bench_semi_cml.py [--steps 10] [--rounds 2] [--channels 16,32,64,128,256] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

import torch

from bundle_steps import REPO, build_trainer, data_dir, step_row, time_steps, write_result

KINDS = {"supervised pair": "supervised", "semi-cml": "cml", "mean teacher": "mean_teacher"}


def child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"dataset_dir": args.data_dir, "ckpt_dir": tmp, "max_epochs": 1, "val_interval": 2,
                     "epoch_length": args.steps + args.warmup, "method": args.method,
                     "channels": [int(c) for c in args.channels.split(",")]}
        trainer = build_trainer("semi_cml", "train.json", overrides)
        t = time_steps(trainer, args.warmup)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({**t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "peak_gpu_mb": peak_gpu}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=data_dir("brats18_2mm"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--channels", default="16,32,64,128,256")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.method:
        return child(args)

    samples = {k: {"wait": [], "compute": [], "peak_rss_mb": [], "peak_gpu_mb": []} for k in KINDS}
    for r in range(args.rounds):
        for kind, method in KINDS.items():
            cmd = [sys.executable, __file__, "--method", method, "--data_dir", args.data_dir, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--channels", args.channels]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            for key in samples[kind]:
                samples[kind][key] += res[key] if isinstance(res[key], list) else [res[key]]
            print(f"round {r + 1}/{args.rounds} {kind}: {len(res['compute'])} steps", flush=True)

    rows = []
    for kind, s in samples.items():
        row = step_row(kind, s, 4 if kind == "supervised pair" else 8)  # crops through networks per step
        row["peak_rss_mb"] = round(max(s["peak_rss_mb"]), 1)
        gpu = [v for v in s["peak_gpu_mb"] if v is not None]
        row["peak_gpu_mb"] = round(max(gpu), 1) if gpu else None
        rows.append(row)
    ref = rows[0]
    for r in rows:
        r["step_time_vs_two_supervised"] = round(r["step_s"] / ref["step_s"], 2)
        r["peak_rss_vs_two_supervised"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "channels": args.channels, "rows": rows}
    print(f"\n{'step (crops 64^3)':<20}{'s/step':>8}{'data wait':>11}{'x 2 sup.':>10}{'peak RSS MB':>13}{'x 2 sup.':>10}")
    for r in rows:
        print(f"{r['kind']:<20}{r['step_s']:>8.3f}{r['data_wait_fraction']:>11.1%}{r['step_time_vs_two_supervised']:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_vs_two_supervised']:>10.2f}")
    print("(x 2 sup.: relative to 'supervised pair', which is two independent supervised steps of the two networks)")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
