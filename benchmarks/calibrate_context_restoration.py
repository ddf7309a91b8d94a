"""Calibrate the context restoration pretext outside the harness: how far below the identity (the corrupted
input returned unchanged) does the bundle's U-Net bring the held-out L2 restoration error, posed three ways?

- ``direct``: the network outputs the restored image (the paper's plain formulation);
- ``additive``: ``x + f(x)``, the output head zero-initialised (starts at the identity);
- ``gated``: :class:`medssl.networks.GatedRestoration`, ``x + sigmoid(g) * (c - x)`` (the bundle's).

Data: the first 12 cases of brats18_2mm train, 12 crops of the last 3 are held out (``--held_out``); the
bundle's pretraining preprocessing and corruption (20 swaps of 8^3 patches in 64^3 crops, batch 1 x 2 crops),
Adam, cosine schedule over ``--steps``. Also prints the oracle that knows the corrupted voxels and fills them
by normalised Gaussian convolution of the rest (what "detect and inpaint" can reach without finding the
swapped partner). Usage::

    OMP_NUM_THREADS=1 python benchmarks/calibrate_context_restoration.py --mode gated --steps 1500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.networks.nets import UNet
from monai.transforms import (Compose, CopyItemsd, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd,
                              Orientationd, RandFlipd, RandSpatialCropSamplesd, SpatialPadd)
from scipy.ndimage import gaussian_filter

from medssl.networks import GatedRestoration
from medssl.transforms import RandContextSwapd
from medssl.utils import data_root


def pretext_transform(num_samples: int) -> Compose:
    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
                    NormalizeIntensityd("image", nonzero=True, channel_wise=True), SpatialPadd("image", [64] * 3),
                    EnsureTyped("image", dtype=torch.float32),
                    RandSpatialCropSamplesd("image", [64] * 3, num_samples, random_size=False),
                    RandFlipd("image", 0.5, 0), CopyItemsd("image", names="label"),
                    RandContextSwapd("image", [8] * 3, 20, foreground_only=True)])


def cases(root: Path) -> list[dict]:
    return [{"image": [str(c / f"{c.name}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]}
            for c in sorted(p for p in root.iterdir() if p.is_dir())]


def network(mode: str) -> torch.nn.Module:
    unet = UNet(3, 4, 8 if mode == "gated" else 4, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=0)
    if mode == "gated":
        return GatedRestoration(unet)
    if mode == "additive":
        head = unet.model[-1].conv
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)

        class Additive(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, x):
                return x + self.unet(x)

        return Additive()
    return unet


def errors(pred, x, y) -> tuple[float, float]:
    """(overall, corrupted-voxel) MSE ratios to the identity's."""
    bad = (x != y).any(1, keepdim=True).expand_as(x)
    e, i = (pred - y) ** 2, (x - y) ** 2
    return float(e.mean() / i.mean()), float(e[bad].mean() / i[bad].mean())


def oracle(x, y, sigma: float = 2.0) -> torch.Tensor:
    xs, ys = x.numpy(), y.numpy()
    keep = ((xs == ys).all(1) & (xs != 0).any(1)).astype(float)
    fill = np.stack([[gaussian_filter(xs[i, c] * keep[i], sigma) / np.maximum(gaussian_filter(keep[i], sigma), 1e-3)
                      for c in range(xs.shape[1])] for i in range(len(xs))])
    return torch.from_numpy(np.where((xs != ys).any(1, keepdims=True), fill, xs)).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("direct", "additive", "gated"), default="gated")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--held_out", type=int, default=3)
    ap.add_argument("--data", default=str(data_root() / "brats18_2mm"))
    args = ap.parse_args()
    all_cases = cases(Path(args.data))
    train, held = all_cases[:-args.held_out], all_cases[-args.held_out:]
    t = pretext_transform(2)
    t.set_random_state(0)
    loader = DataLoader(CacheDataset(train, t, cache_rate=1.0, progress=False), batch_size=1, shuffle=True)
    th = pretext_transform(4)
    th.set_random_state(123)
    crops = [d for out in Dataset(held, th) for d in out]
    hx = torch.stack([d["image"].as_tensor() for d in crops])
    hy = torch.stack([d["label"].as_tensor() for d in crops])
    print(f"{len(crops)} held-out crops of {len(held)} cases; identity MSE {float(((hx - hy) ** 2).mean()):.4f}; "
          f"oracle detect-and-inpaint: {errors(oracle(hx, hy), hx, hy)[0]:.3f}x the identity", flush=True)
    torch.manual_seed(0)
    net = network(args.mode)
    opt = torch.optim.Adam(net.parameters(), args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    step, t0 = 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            loss = torch.nn.functional.mse_loss(net(batch["image"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 250 == 0 or step == args.steps:
                net.eval()
                with torch.no_grad():
                    pred = torch.cat([net(hx[i:i + 4]) for i in range(0, len(hx), 4)])
                net.train()
                ratio, corrupted = errors(pred, hx, hy)
                print(f"{args.mode} step {step} ({time.perf_counter() - t0:.0f} s): held-out MSE {ratio:.3f}x the "
                      f"identity's, {corrupted:.3f}x on the swapped voxels", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
