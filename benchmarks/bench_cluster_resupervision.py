#!/usr/bin/env python
"""Cost of cluster re-supervision per batch against the training step (issue 6): it must not dominate.

Not a test: it prints a table and optionally writes JSON. Everything is measured in ONE run on the
same real BraTS slices (the bundle's training slices, padded to 96^2), interleaved over ``--rounds``:

  * ``cluster maps``: k-means of the pixel features of a batch + the clusters' score drops (the tumour
    images re-classified with each cluster masked out, one batched forward) (``medssl.losses.cluster_maps``:
    what the re-supervision adds, without gradient);
  * ``CAM step``: forward + backward + Adam step of ``CAMSegNet`` with the classification loss only;
  * ``full step``: the bundle's ``ClusterReSupervisionIteration`` step (classification + re-supervision
    + reconstruction, i.e. a second forward on the masked input).
The share of the cluster maps in the full step is reported.

    python benchmarks/bench_cluster_resupervision.py [--batch 16] [--clusters 4] [--steps 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from monai.engines import SupervisedTrainer

from medssl.data import bundle_datalist, training_slices
from medssl.engines import ClusterReSupervisionIteration
from medssl.losses import ClusterReSupervisionLoss, cluster_maps
from medssl.networks import CAMSegNet
from medssl.transforms import RandPatchMaskd

from bundle_steps import data_dir, environment, time_steps, write_result


def batches(data_dir: str, batch: int, n: int, seed: int = 0) -> list[dict]:
    slices = training_slices(bundle_datalist(data_dir, seed=seed))
    rng = np.random.default_rng(seed)
    mask = RandPatchMaskd("image", patch_size=8, mask_ratio=0.5).set_random_state(seed)
    out = []
    for _ in range(n):
        pick = rng.choice(len(slices), batch, replace=False)
        img = torch.zeros(batch, 4, 96, 96)
        for j, i in enumerate(pick):
            h, w = slices[i]["image"].shape[1:]
            img[j, :, : min(h, 96), : min(w, 96)] = torch.as_tensor(slices[i]["image"][:, :96, :96])
        masked = torch.stack([mask({"image": x})["image"] for x in img])
        out.append({"image": img, "class": torch.tensor([slices[i]["class"] for i in pick]), "masked_image": masked})
    return out


def time_trainer(net, iteration, data, warmup: int = 2) -> float:
    """Median seconds of a training step (after ``warmup`` steps) of ``iteration`` on the batches ``data``."""
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=len(data), train_data_loader=data,
                                network=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=None,
                                iteration_update=iteration)
    return float(np.median(time_steps(trainer, warmup)["compute"]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=data_dir("brats18_2mm"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    data = batches(args.data_dir, args.batch, args.steps + 2)
    torch.manual_seed(0)
    net = CAMSegNet(2, 4)
    seconds = {"cluster maps": [], "CAM step": [], "full step": []}
    for _ in range(args.rounds):
        with torch.no_grad():
            heads = [net.outputs(d["image"]) for d in data[:3]]
        t = []
        for d, h in zip(data[:3], heads):
            t0 = time.perf_counter()
            cluster_maps(h["features"], h["cam"], d["class"], d["image"][:, 0] != 0, num_clusters=args.clusters,
                         image=d["image"], classifier=net.classify)
            t.append(time.perf_counter() - t0)
        seconds["cluster maps"].append(float(np.median(t)))
        seconds["CAM step"].append(time_trainer(net, ClusterReSupervisionIteration(None), data))
        full = ClusterReSupervisionIteration(ClusterReSupervisionLoss(args.clusters), 1.0, reconstruction_weight=1.0)
        seconds["full step"].append(time_trainer(net, full, data))
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    share = med["cluster maps"] / med["full step"]
    result = {**environment(), "batch": args.batch,
              "clusters": args.clusters, "seconds": med, "cluster_share_of_full_step": round(share, 4),
              "full_step_vs_cam_step": round(med["full step"] / med["CAM step"], 2)}
    print(f"\n{'per batch of ' + str(args.batch) + ' x 4 x 96^2':<28}{'seconds':>10}")
    for k, v in med.items():
        print(f"{k:<28}{v:>10.4f}")
    print(f"cluster maps are {share:.1%} of a full training step; the full step is "
          f"{result['full_step_vs_cam_step']:.2f}x a CAM-only step ({result['threads']} torch threads)")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
