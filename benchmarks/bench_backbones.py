#!/usr/bin/env python
"""Cost of context_restoration's candidate backbones (issue 12): seconds per fine-tuning step of MONAI's
``UNet`` (channels 16..256, strides 2) with ``num_res_units`` 0 (the bundle's original: one strided conv
per level), 1 and 2, through the bundle's own train.json (batch 2 x 4 x 64^3, DiceCE, Adam), on the
real BraTS data. Every ratio is against ``num_res_units=0`` measured in the same run, contenders
interleaved over ``--rounds`` so that they share the background load. Together with each backbone's
converged validation Dice it decides the backbone: a CPU benchmark of 30 fine-tunings x up to 2,400 steps
must fit in about 2 hours.

    python benchmarks/bench_backbones.py [--steps 8] [--rounds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from bundle_steps import build_trainer, data_dir, environment, step_row, time_steps

CANDIDATES = (0, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    samples = {r: {"wait": [], "compute": []} for r in CANDIDATES}
    params = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for r in CANDIDATES:
                trainer = build_trainer("context_restoration", "train.json", {
                    "dataset_dir": data_dir("brats18_2mm"), "ckpt_dir": f"{tmp}/r{r}", "init": "baseline",
                    "device": "$torch.device('cpu')", "amp": False, "network_def#num_res_units": r,
                    "max_epochs": 1, "epoch_length": args.warmup + args.steps, "val_interval": 1000, "patience": 0,
                    "train#handlers": []})
                params[r] = sum(p.numel() for p in trainer.network.parameters())
                got = time_steps(trainer, args.warmup)
                for k in got:
                    samples[r][k] += got[k]
    rows = [step_row(f"UNet num_res_units={r}", samples[r], 2, num_res_units=r, parameters=params[r]) for r in CANDIDATES]
    ref = rows[0]["step_s"]
    print(f"{'backbone':<24}{'params':>10}{'s/step':>9}{'x res0':>8}{'s per 2,400 steps':>20}")
    for row in rows:
        row["ratio_to_res0"] = round(row["step_s"] / ref, 2)
        print(f"{row['kind']:<24}{row['parameters']:>10,}{row['step_s']:>9.3f}{row['ratio_to_res0']:>8.2f}"
              f"{row['step_s'] * 2400 / 60:>17.1f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
