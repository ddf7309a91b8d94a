#!/usr/bin/env python
"""Speed benchmark of the context-restoration corruption ``medssl.transforms.RandContextSwapd``.

Not a test: it prints a table and optionally writes the numbers to JSON. Everything is measured in
ONE run on the SAME real BraTS crops, and every ratio is taken between numbers of that run (timings
on a shared machine are noisy; ratios within a run are what matters).

Rows
  1. ``RandContextSwapd`` (patch 8^3, 20 swaps, ``foreground_only=True``: the pretrain.json
     defaults) on 4 x 64^3 crops, as the bundle feeds it (MONAI ``MetaTensor``), and also on plain
     ``torch.Tensor`` crops (what torchio holds internally, the like-for-like comparison).
  2. torchio ``RandomSwap(patch_size=8, num_iterations=20)`` on the same crops as 4-channel
     ``ScalarImage`` subjects (skipped with a message when torchio is not importable). NB torchio
     neither restricts patches to the foreground nor keeps all 40 patches mutually disjoint, so
     it does strictly less work per sample.
  3. A naive pure-Python reference: the same swaps (same corner sampler) but copying voxel by
     voxel with nested Python loops; run on fewer samples and reported per sample.
  4. UNet (MONAI, 16-256 channels, 4 levels) + Adam on batches of 2 x 4 x 64^3: a plain supervised
     step (MSE to a fixed target) vs a pretraining step (corrupt the 2 samples with
     ``RandContextSwapd`` + the same forward/backward/step, target = the original); the share of
     the corruption in the pretraining step. The two kinds of step are interleaved so that they
     see the same background load.

Transform rows are timed at each of ``--transform_threads`` torch thread counts (default: 1, as in a
DataLoader worker and the headline; then all cores, as in the bundle's ``num_workers=0`` main
process), interleaved in ``--rounds`` rounds so that all contenders share the background load. A
per-stage breakdown of ``RandContextSwap`` (foreground mask / patch placement / clone + swap) follows.

Data: ``--data_dir`` or ``$MEDSSL_DATA_DIR/brats18_2mm`` or ``<repo>/../shared/data/brats18_2mm``,
layout ``<case>/<case>_{flair,t1,t1ce,t2}.nii.gz``; preprocessed as the bundle does (channel-first
stack, RAS, z-normalisation of nonzero voxels per channel, pad to >= 64^3, random 64^3 crops).

    python benchmarks/bench_context_swap.py [--samples 200] [--steps 10] [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import monai
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd,
                              Orientationd, RandSpatialCropSamplesd, SpatialPadd)
from monai.utils import set_determinism

from medssl.transforms import RandContextSwapd
from medssl.transforms.context_swap import RandContextSwap

try:
    import torchio as tio
except ImportError as e:  # the torchio row is optional
    tio = None
    TIO_ERROR = f"{type(e).__name__}: {e}"
else:
    TIO_ERROR = ""

MODALITIES = ("flair", "t1", "t1ce", "t2")
ROI = (64, 64, 64)
PATCH = 8
NUM_SWAPS = 20
REPO = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    root = os.environ.get("MEDSSL_DATA_DIR") or str(REPO.parent / "shared" / "data")
    return Path(root) / "brats18_2mm"


def find_cases(data_dir: Path) -> list[dict]:
    cases = []
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        paths = [d / f"{d.name}_{m}.nii.gz" for m in MODALITIES]
        if all(p.is_file() for p in paths):
            cases.append({"case": d.name, "image": [str(p) for p in paths]})
    return cases


def load_crops(data_dir: Path, crops_per_case: int, seed: int) -> tuple[list[MetaTensor], list[tuple]]:
    """Bundle preprocessing + ``crops_per_case`` random 64^3 crops per case (MetaTensors, float32)."""
    cases = find_cases(data_dir)
    if not cases:
        sys.exit(f"no BraTS case with all of {MODALITIES} under {data_dir} (set --data_dir or MEDSSL_DATA_DIR)")
    pre = Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        SpatialPadd("image", spatial_size=ROI),
        EnsureTyped("image", dtype=torch.float32),
    ])
    crop = RandSpatialCropSamplesd("image", roi_size=ROI, num_samples=crops_per_case, random_size=False)
    crop.set_random_state(seed)
    crops, shapes = [], []
    for case in cases:
        vol = pre(case)["image"]
        shapes.append(tuple(vol.shape))
        for s in crop({"image": vol}):
            crops.append(s["image"].contiguous())
    return crops, shapes


# ----------------------------------------------------------------------------------------------
# naive reference: same corners, voxel-by-voxel copy in nested Python loops


def naive_swap(img: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    out = img.copy()
    nc = out.shape[0]
    for a, b in corners:
        a0, a1, a2 = (int(v) for v in a)
        b0, b1, b2 = (int(v) for v in b)
        for c in range(nc):
            for i in range(patch):
                for j in range(patch):
                    for k in range(patch):
                        tmp = out[c, a0 + i, a1 + j, a2 + k]
                        out[c, a0 + i, a1 + j, a2 + k] = out[c, b0 + i, b1 + j, b2 + k]
                        out[c, b0 + i, b1 + j, b2 + k] = tmp
    return out


# ----------------------------------------------------------------------------------------------
# timing helpers


def timed_rounds(fns: dict, inputs: dict, n: int, rounds: int) -> dict:
    """Run each ``fns[name]`` on ``n`` inputs (cycling ``inputs[name]``), split into ``rounds``
    interleaved rounds (order alternated) so that all contenders share the background load."""
    per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    total = {k: 0.0 for k in fns}
    done = {k: 0 for k in fns}
    names = list(fns)
    for r, m in enumerate(per_round):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, pool = fns[name], inputs[name]
            start = done[name]
            t0 = time.perf_counter()
            for i in range(start, start + m):
                fn(pool[i % len(pool)])
            total[name] += time.perf_counter() - t0
            done[name] += m
    return {k: {"samples": done[k], "seconds": total[k], "samples_per_s": done[k] / total[k] if total[k] else None}
            for k in fns}


def bench_training(crops: list[MetaTensor], steps: int, warmup: int, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net_sup = UNet(spatial_dims=3, in_channels=4, out_channels=4, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=0)
    net_pre = copy.deepcopy(net_sup)
    opt_sup = torch.optim.Adam(net_sup.parameters(), lr=1e-3, weight_decay=1e-5)
    opt_pre = torch.optim.Adam(net_pre.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = torch.nn.MSELoss()
    fixed_target = torch.randn(2, 4, *ROI)
    swap = RandContextSwapd("image", patch_size=PATCH, num_swaps=NUM_SWAPS, foreground_only=True)
    swap.set_random_state(seed)

    def batch(i: int) -> list[MetaTensor]:
        return [crops[(2 * i) % len(crops)], crops[(2 * i + 1) % len(crops)]]

    def step(net, opt, x, y) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def supervised(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        x = torch.stack([s.as_tensor() for s in batch(i)])
        step(net_sup, opt_sup, x, fixed_target)
        return time.perf_counter() - t0, 0.0

    def pretraining(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        samples = [swap({"image": s, "label": s}) for s in batch(i)]  # label = the uncorrupted original
        t1 = time.perf_counter()
        x = torch.stack([d["image"].as_tensor() for d in samples])
        y = torch.stack([d["label"].as_tensor() for d in samples])
        step(net_pre, opt_pre, x, y)
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0

    for i in range(warmup):
        supervised(i)
        pretraining(i)
    sup_t, pre_t, cor_t = [], [], []
    for i in range(warmup, warmup + steps):  # interleaved, order alternated
        order = (supervised, pretraining) if i % 2 == 0 else (pretraining, supervised)
        for fn in order:
            total, corr = fn(i)
            if fn is supervised:
                sup_t.append(total)
            else:
                pre_t.append(total)
                cor_t.append(corr)
    sup, pre, cor = sum(sup_t), sum(pre_t), sum(cor_t)
    return {
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "supervised_s_per_step": sup / steps,
        "pretraining_s_per_step": pre / steps,
        "corruption_s_per_step": cor / steps,
        "supervised_steps_per_s": steps / sup,
        "pretraining_steps_per_s": steps / pre,
        "pretraining_over_supervised": (steps / pre) / (steps / sup),
        "corruption_share": cor / pre,
        "supervised_median_s": float(np.median(sup_t)),
        "pretraining_median_s": float(np.median(pre_t)),
    }


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=200, help="samples timed per transform (default 200)")
    ap.add_argument("--naive_samples", type=int, default=4, help="samples for the naive loop (default 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps of each kind (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps of each kind (default 2)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds per transform (default 4)")
    ap.add_argument("--crops_per_case", type=int, default=2)
    ap.add_argument("--data_dir", type=Path, default=None, help="BraTS 2 mm folder (default: "
                    "$MEDSSL_DATA_DIR/brats18_2mm, else <repo>/../shared/data/brats18_2mm)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the training steps (default: all available cores)")
    ap.add_argument("--transform_threads", type=str, default="1,all",
                    help="comma-separated torch thread counts for the transform rows; the first is the headline "
                         "(default '1,all': 1 = a DataLoader worker, 'all' = the training thread count)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers to this JSON file")
    args = ap.parse_args(argv)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    transform_threads = []
    for v in args.transform_threads.split(","):
        v = threads if v.strip() == "all" else int(v)
        if v not in transform_threads:
            transform_threads.append(v)
    torch.set_num_threads(threads)
    set_determinism(seed=args.seed)
    data_dir = args.data_dir or default_data_dir()
    t_start = time.perf_counter()

    print(f"python {platform.python_version()}  torch {torch.__version__}  monai {monai.__version__}  "
          f"torchio {tio.__version__ if tio else 'not importable'}  numpy {np.__version__}  "
          f"cores {threads}  transform threads {transform_threads}")
    t0 = time.perf_counter()
    crops, shapes = load_crops(data_dir, args.crops_per_case, args.seed)
    print(f"data: {data_dir}: {len(shapes)} cases (e.g. {shapes[0]}), {len(crops)} crops of {tuple(crops[0].shape)} "
          f"{crops[0].dtype}, loaded in {time.perf_counter() - t0:.1f} s")
    print(f"corruption: patch {PATCH}^3, {NUM_SWAPS} swaps; {args.samples} samples per transform, "
          f"{args.rounds} interleaved rounds\n")

    plain = [c.as_tensor().clone() for c in crops]
    arrays = [c.numpy() for c in plain]
    subjects = ([tio.Subject(image=tio.ScalarImage(tensor=c.clone(), affine=np.asarray(m.affine)))
                 for c, m in zip(plain, crops)] if tio is not None else [])

    # sanity: same corners -> naive loop == RandContextSwap; output is a permutation of the input
    chk = RandContextSwap(PATCH, NUM_SWAPS, foreground_only=True)
    chk.set_random_state(args.seed)
    ref = chk(plain[0])
    assert np.array_equal(naive_swap(arrays[0], chk.corners, PATCH), ref.numpy()), "naive loop != RandContextSwap"
    assert torch.equal(ref.flatten().sort().values, plain[0].flatten().sort().values), "not a permutation"

    # ---- 1 + 2: transforms, interleaved, at each requested torch thread count
    res_by_threads = {}
    for nt in transform_threads:
        torch.set_num_threads(nt)
        swap_meta = RandContextSwapd("image", patch_size=PATCH, num_swaps=NUM_SWAPS, foreground_only=True)
        swap_meta.set_random_state(args.seed)
        swap_plain = RandContextSwapd("image", patch_size=PATCH, num_swaps=NUM_SWAPS, foreground_only=True)
        swap_plain.set_random_state(args.seed)
        fns = {"medssl_metatensor": swap_meta, "medssl_tensor": swap_plain}
        inputs = {"medssl_metatensor": [{"image": c} for c in crops], "medssl_tensor": [{"image": c} for c in plain]}
        if tio is not None:
            torch.manual_seed(args.seed)  # torchio draws with torch's global generator
            fns["torchio"] = tio.RandomSwap(patch_size=PATCH, num_iterations=NUM_SWAPS)
            inputs["torchio"] = subjects
        for name, fn in fns.items():  # warm-up
            fn(inputs[name][0])
        res_by_threads[nt] = timed_rounds(fns, inputs, args.samples, args.rounds)

    # ---- breakdown of RandContextSwap (headline thread count): mask, rest of randomize, swap
    torch.set_num_threads(transform_threads[0])
    bd = {}
    for name, pool in (("metatensor", crops), ("tensor", plain)):
        sw = RandContextSwap(PATCH, NUM_SWAPS, foreground_only=True)
        sw.set_random_state(args.seed)
        t_mask = t_rand = t_swap = 0.0
        n_bd = max(1, args.samples // 4)
        for i in range(n_bd):
            x = pool[i % len(pool)]
            t0 = time.perf_counter()
            sw.select_fn(x)
            t1 = time.perf_counter()
            sw.randomize(x)  # computes the mask again, then draws + places the patches
            t2 = time.perf_counter()
            sw.swap(x, sw.corners)
            t3 = time.perf_counter()
            t_mask, t_rand, t_swap = t_mask + t1 - t0, t_rand + t2 - t1, t_swap + t3 - t2
        bd[name] = {"samples": n_bd, "mask_ms": 1e3 * t_mask / n_bd, "randomize_ms": 1e3 * t_rand / n_bd,
                    "placement_ms": 1e3 * (t_rand - t_mask) / n_bd, "swap_ms": 1e3 * t_swap / n_bd}

    # ---- 3: naive loop (fewer samples): same sampler on the same tensor, voxel-by-voxel copy
    naive = RandContextSwap(PATCH, NUM_SWAPS, foreground_only=True)
    naive.set_random_state(args.seed)
    t_draw = t_copy = 0.0
    for i in range(args.naive_samples):
        t0 = time.perf_counter()
        naive.randomize(plain[i % len(plain)])
        t1 = time.perf_counter()
        naive_swap(arrays[i % len(arrays)], naive.corners, PATCH)
        t2 = time.perf_counter()
        t_draw, t_copy = t_draw + t1 - t0, t_copy + t2 - t1
    naive_s = (t_draw + t_copy) / max(args.naive_samples, 1)
    naive_copy_s = t_copy / max(args.naive_samples, 1)

    # ---- 4: training steps
    train = bench_training(crops, args.steps, args.warmup, args.seed, threads)

    # ---- report
    w = 52
    head = transform_threads[0]
    res = res_by_threads[head]
    tio_ok = "torchio" in res
    print(f"{'transform (4x64^3 crop, patch 8^3, 20 swaps)':<{w}} {'threads':>7} {'samples':>7} {'samples/s':>10} "
          f"{'ms/sample':>10} {'vs torchio':>10} {'vs naive':>9}")
    print("-" * (w + 59))
    labels = {"medssl_metatensor": "RandContextSwapd, MetaTensor (as in the bundle)",
              "medssl_tensor": "RandContextSwapd, plain torch.Tensor",
              "torchio": f"torchio {tio.__version__ if tio else ''} RandomSwap, ScalarImage"}
    for nt in transform_threads:
        r_nt = res_by_threads[nt]
        t_sps = r_nt["torchio"]["samples_per_s"] if "torchio" in r_nt else None
        for key, r in r_nt.items():
            sps = r["samples_per_s"]
            vt = f"{sps / t_sps:9.2f}x" if t_sps else f"{'n/a':>10}"
            print(f"{labels[key]:<{w}} {nt:>7d} {r['samples']:>7d} {sps:>10.1f} {1e3 / sps:>10.2f} {vt} "
                  f"{sps * naive_s:>8.1f}x")
        if not tio_ok:
            print(f"{'torchio RandomSwap':<{w}} {nt:>7d}  SKIPPED: torchio not importable ({TIO_ERROR})")
    t_head = res["torchio"]["samples_per_s"] if tio_ok else None
    vt = f"{(1 / naive_s) / t_head:9.3f}x" if t_head else f"{'n/a':>10}"
    print(f"{'naive Python voxel loop (reference)':<{w}} {head:>7d} {args.naive_samples:>7d} {1 / naive_s:>10.2f} "
          f"{1e3 * naive_s:>10.2f} {vt} {1:>8.1f}x")
    print(f"{'  of which the voxel-by-voxel copy':<{w}} {'':>7} {'':>7} {'':>10} {1e3 * naive_copy_s:>10.2f}")

    print(f"\nRandContextSwap breakdown ({head} thread(s), ms/sample)   {'fg mask':>9} {'placement':>10} "
          f"{'swap+clone':>11} {'total':>8}")
    for name, r in bd.items():
        print(f"  {name:<52} {r['mask_ms']:>9.2f} {r['placement_ms']:>10.2f} {r['swap_ms']:>11.2f} "
              f"{r['randomize_ms'] + r['swap_ms']:>8.2f}")

    print(f"\ntraining step: UNet 16-256 x4 levels, Adam, batch 2x4x64^3, {train['threads']} threads, "
          f"{train['warmup']} warm-up + {train['steps']} timed steps each (interleaved)")
    print(f"{'step':<{w}} {'s/step':>8} {'steps/s':>10} {'median s':>10}")
    print("-" * (w + 31))
    print(f"{'supervised (fwd + MSE + bwd + Adam)':<{w}} {train['supervised_s_per_step']:>8.3f} "
          f"{train['supervised_steps_per_s']:>10.3f} {train['supervised_median_s']:>10.3f}")
    print(f"{'pretraining (2x RandContextSwapd + the same step)':<{w}} {train['pretraining_s_per_step']:>8.3f} "
          f"{train['pretraining_steps_per_s']:>10.3f} {train['pretraining_median_s']:>10.3f}")
    print(f"{'  of which the corruption (2 samples)':<{w}} {train['corruption_s_per_step']:>8.4f}")

    med = res["medssl_metatensor"]["samples_per_s"]
    med_t = res["medssl_tensor"]["samples_per_s"]
    summary = {
        "transform_threads": head,
        "randcontextswapd_samples_per_s": med,
        "randcontextswapd_plain_tensor_samples_per_s": med_t,
        "torchio_samples_per_s": t_head,
        "ratio_medssl_over_torchio": med / t_head if t_head else None,
        "ratio_medssl_plain_tensor_over_torchio": med_t / t_head if t_head else None,
        "naive_loop_s_per_sample": naive_s,
        "naive_loop_copy_s_per_sample": naive_copy_s,
        "speedup_over_naive": med * naive_s,
        "supervised_steps_per_s": train["supervised_steps_per_s"],
        "pretraining_steps_per_s": train["pretraining_steps_per_s"],
        "ratio_pretraining_over_supervised": train["pretraining_over_supervised"],
        "corruption_share_percent": 100 * train["corruption_share"],
    }
    for nt in transform_threads[1:]:
        r_nt = res_by_threads[nt]
        if "torchio" in r_nt:
            summary[f"ratio_medssl_over_torchio_{nt}_threads"] = (r_nt["medssl_metatensor"]["samples_per_s"]
                                                                  / r_nt["torchio"]["samples_per_s"])

    def verdict(ok):
        return "OK" if ok else "MISSED"

    print(f"\nSUMMARY (transforms at {head} thread(s); training at {train['threads']} threads)")
    print(f"  RandContextSwapd                 {med:9.1f} samples/s   (plain tensor: {med_t:.1f})")
    if t_head:
        r, rt = med / t_head, med_t / t_head
        print(f"  torchio RandomSwap               {t_head:9.1f} samples/s")
        print(f"  ratio medssl / torchio           {r:9.2f}x            (plain tensor: {rt:.2f}x)   "
              f"target >= 1: {verdict(r >= 1)}")
        for nt in transform_threads[1:]:
            if f"ratio_medssl_over_torchio_{nt}_threads" in summary:
                print(f"  ratio medssl / torchio, {nt} thr   {summary[f'ratio_medssl_over_torchio_{nt}_threads']:9.2f}x")
    else:
        print(f"  torchio RandomSwap               skipped ({TIO_ERROR})")
    print(f"  naive loop                       {1e3 * naive_s:9.1f} ms/sample (copy alone {1e3 * naive_copy_s:.1f} ms); "
          f"RandContextSwapd is {med * naive_s:.1f}x faster")
    print(f"  supervised steps/s               {train['supervised_steps_per_s']:9.3f}")
    print(f"  pretraining steps/s              {train['pretraining_steps_per_s']:9.3f}")
    print(f"  ratio pretraining / supervised   {train['pretraining_over_supervised']:9.3f}")
    print(f"  corruption share of pretraining  {100 * train['corruption_share']:9.2f} %   "
          f"target < 10 %: {verdict(train['corruption_share'] < 0.10)}")
    print(f"  total benchmark time             {time.perf_counter() - t_start:9.1f} s")

    result = {
        "summary": summary,
        "transforms": {str(k): v for k, v in res_by_threads.items()},
        "breakdown_ms": bd,
        "training": train,
        "config": {"samples": args.samples, "naive_samples": args.naive_samples, "steps": args.steps,
                   "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed, "threads": threads,
                   "transform_threads": transform_threads,
                   "patch_size": PATCH, "num_swaps": NUM_SWAPS, "roi": ROI, "data_dir": str(data_dir),
                   "cases": len(shapes), "crops": len(crops)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                     "numpy": np.__version__, "torchio": tio.__version__ if tio else None},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"  written to {args.out}")
    return result


if __name__ == "__main__":
    main()
