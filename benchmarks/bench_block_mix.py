#!/usr/bin/env python
"""Speed of the SLeM pretext (issue 4): ``RandModalityBlockMixd`` samples/s and its share of the
pretraining step; pretraining steps/s against a plain supervised step of the same network.

Not a test: it prints a table and optionally writes JSON. Everything is measured in ONE run on the
SAME real BraTS crops, and every ratio is between numbers of that run; contenders are interleaved in
``--rounds`` rounds so that they share the background load.

Transform rows (4 x 64^3 MetaTensor crops, as the bundle feeds them; ``--blocks`` grid, 100 classes):
  * ``RandModalityBlockMixd``: M x B strided block copies straight into the output;
  * two references applying the same draw: a single gather on a (M, B, *block) view (fully
    vectorised, extra full copies) and one channel gather per block position;
  * ``RandContextSwapd`` (our other pretext corruption, T=20 pairs of 8^3 patches) for scale.
Step rows (the bundle's own configs through MONAI's ``SupervisedTrainer``, see ``bundle_steps.py``):
  * ``block_mix pretext``: pretrain.json (crop, flip, block mix, CFBUNet encoder + classifier, CE);
  * ``context_restoration pretext``: pretrain.json ``pretext=context_restoration`` (full network, MSE);
  * ``supervised``: train.json from scratch (DiceCE on TC/WT/ET, full network) - the reference.
All with batch 2 x 4 x 64^3.

    python benchmarks/bench_block_mix.py [--samples 100] [--steps 10] [--rounds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import monai
from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd,
                              Orientationd, RandSpatialCropSamplesd, SpatialPadd)

from medssl.data import brats_cases
from medssl.transforms import RandContextSwapd, RandModalityBlockMixd

from bundle_steps import build_trainer, data_dir, step_row, time_steps, write_result


def real_crops(data_dir: Path, n: int, roi=(64, 64, 64), seed: int = 0) -> list:
    load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                    Orientationd("image", axcodes="RAS"), NormalizeIntensityd("image", nonzero=True, channel_wise=True),
                    SpatialPadd("image", roi), EnsureTyped("image", dtype=torch.float32)])
    crop = RandSpatialCropSamplesd("image", roi, num_samples=max(1, math.ceil(n / 4)), random_size=False)
    crop.set_random_state(seed)
    crops = []
    for case in brats_cases(str(data_dir))[:4]:
        crops += [c["image"] for c in crop(load({"image": case["image"]}))]
    return crops[:n]


def references(mixer: RandModalityBlockMixd) -> dict:
    """Two other ways to apply the combination ``mixer`` draws (same draw, same output):
    ``one gather``: a single advanced-indexing gather on a (M, B, *block) view of the image (fully
    vectorised, but the view must be made contiguous and permuted back: two extra full copies);
    ``channel gather per block``: B advanced-indexing gathers of all channels of one block (a gather
    and then a copy into the output per block)."""
    t = mixer.mixer

    def layout(img):
        t.randomize()
        grid = t.grid(img.ndim - 1)
        return img.as_tensor(), grid, [s // g for s, g in zip(img.shape[1:], grid)], \
            t.combinations_for(math.prod(grid))[t.label]

    def one_gather(d):
        x, grid, size, table = layout(d["image"])
        m, nd, nb = x.shape[0], len(grid), math.prod(grid)
        split = (m,) + tuple(v for g, s in zip(grid, size) for v in (g, s))
        order = (0,) + tuple(range(1, 2 * nd, 2)) + tuple(range(2, 2 * nd + 1, 2))
        view = x.reshape(split).permute(order).reshape((m, nb, *size))
        out = view[torch.as_tensor(table), torch.arange(nb)[None, :]]
        out = out.reshape((m, *grid, *size)).permute(tuple(int(i) for i in np.argsort(order))).reshape(x.shape)
        return {"image": out, "mix_class": torch.as_tensor(t.label)}

    def channel_gather(d):
        x, grid, size, table = layout(d["image"])
        out, src = torch.empty_like(x), torch.as_tensor(np.array(table))
        for b, pos in enumerate(np.ndindex(*grid)):
            sl = tuple(slice(p * s, (p + 1) * s) for p, s in zip(pos, size))
            out[(slice(None), *sl)] = x[(src[:, b], *sl)]
        return {"image": out, "mix_class": torch.as_tensor(t.label)}

    return {"one-gather reference": one_gather, "channel-gather-per-block reference": channel_gather}


def time_transform(fn, crops) -> float:
    t0 = time.perf_counter()
    for x in crops:
        fn({"image": x})
    return (time.perf_counter() - t0) / len(crops)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=data_dir("brats18_2mm"))
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--blocks", default="2,2,1")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]

    crops = real_crops(Path(args.data_dir), args.samples)
    mix = RandModalityBlockMixd("image", blocks=blocks, num_combinations=100).set_random_state(0)
    contenders = {"RandModalityBlockMixd": mix, **references(mix),
                  "RandContextSwapd (T=20, 8^3)": RandContextSwapd("image", 8, 20, foreground_only=True)}
    first = mix.set_random_state(0)({"image": crops[0]})["image"]
    for name in references(mix):  # the references do exactly the same work: same draw, same output
        mix.set_random_state(0)
        assert torch.equal(torch.as_tensor(first), contenders[name]({"image": crops[0]})["image"]), name
    seconds = {k: [] for k in contenders}

    kinds = {"block_mix pretext": ("pretrain.json", {}),
             "context_restoration pretext": ("pretrain.json", {"pretext": "context_restoration"}),
             "supervised": ("train.json", {"init": "baseline"})}
    samples = {k: {"wait": [], "compute": []} for k in kinds}
    inputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, fn in contenders.items():
                seconds[name].append(time_transform(fn, crops))
            for kind, (config, extra) in kinds.items():
                overrides = {"dataset_dir": args.data_dir, "ckpt_dir": f"{tmp}/{r}_{kind}", "output_dir": f"{tmp}/{r}_{kind}",
                             "max_epochs": 1, "epoch_length": args.steps + args.warmup, "val_interval": 2,
                             "blocks": blocks, **extra}
                if config == "train.json":
                    overrides.pop("blocks")
                trainer = build_trainer("slem", config, overrides)
                inputs[kind] = trainer.data_loader.batch_size * 2  # batch 1 case x 2 crops
                t = time_steps(trainer, args.warmup)
                samples[kind]["wait"] += t["wait"]
                samples[kind]["compute"] += t["compute"]
                print(f"round {r + 1}/{args.rounds} {kind}: {len(t['compute'])} steps", flush=True)

    per_sample = {k: float(np.median(v)) for k, v in seconds.items()}
    ref = per_sample["RandModalityBlockMixd"]
    transform_rows = [{"transform": k, "samples_per_s": round(1 / v, 1), "ms_per_sample": round(1000 * v, 3),
                       "speed_vs_block_mix": round(ref / v, 3)} for k, v in per_sample.items()]
    step_rows = [step_row(k, s, inputs[k]) for k, s in samples.items()]
    sup = next(r for r in step_rows if r["kind"] == "supervised")
    for r in step_rows:
        r["steps_per_s_vs_supervised"] = round(r["steps_per_s"] / sup["steps_per_s"], 2)
    pre = next(r for r in step_rows if r["kind"] == "block_mix pretext")
    share = ref * pre["network_inputs_per_step"] / pre["step_s"]

    result = {"torch": torch.__version__, "monai": monai.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "blocks": blocks,
              "crops": len(crops), "transforms": transform_rows, "steps": step_rows,
              "block_mix_share_of_pretraining_step": round(share, 4)}
    print(f"\n{'transform (4 x 64^3 crop)':<38}{'samples/s':>10}{'ms/sample':>11}{'x block mix':>13}")
    for r in transform_rows:
        print(f"{r['transform']:<38}{r['samples_per_s']:>10.1f}{r['ms_per_sample']:>11.3f}{r['speed_vs_block_mix']:>13.3f}")
    print(f"\n{'step (batch 2 x 4 x 64^3)':<32}{'s/step':>8}{'steps/s':>9}{'data wait':>11}{'x supervised':>14}")
    for r in step_rows:
        print(f"{r['kind']:<32}{r['step_s']:>8.3f}{r['steps_per_s']:>9.2f}{r['data_wait_fraction']:>11.1%}"
              f"{r['steps_per_s_vs_supervised']:>14.2f}")
    print(f"\nblock mixing is {share:.1%} of a block_mix pretraining step "
          f"({result['threads']} torch threads; x block mix < 1 means slower than RandModalityBlockMixd)")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
