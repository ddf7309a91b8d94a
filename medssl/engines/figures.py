"""Pictures of an evaluation: one PNG per test case (its input channels, the ground truth and the prediction
overlaid, its Dice in the title), and the benchmark's method-above-baseline stacks of them."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..utils import atomic_write
from .handlers import EvaluationReport

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45


def case_dice(pred: torch.Tensor, label: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Dice of each of the last ``num_regions`` channels of one case's binary ``pred`` and ``label``
    (``(C, *spatial)``; a leading background channel is skipped), scored as :class:`MetricsReport` scores
    it: 1 where both are empty, 0 where only one is."""
    p = torch.as_tensor(pred)[-num_regions:].detach().reshape(num_regions, -1) > 0.5
    t = torch.as_tensor(label)[-num_regions:].detach().reshape(num_regions, -1) > 0.5
    inter = (p & t).sum(1).double()
    total = (p.sum(1) + t.sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def figure_slice(label: torch.Tensor) -> int | None:
    """The axial index (last spatial axis) a 3-D case is drawn at: the slice with the largest ground-truth
    foreground (any channel), the middle slice where the label is empty; None for a 2-D case."""
    label = torch.as_tensor(label)
    if label.ndim < 4:
        return None
    area = (label > 0.5).any(0).sum((0, 1))
    return int(area.argmax()) if bool(area.any()) else label.shape[-1] // 2


def _overlay(masks: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """An RGBA image of binary ``masks`` (regions x H x W), each region in its colour; where regions overlap,
    the smaller region (by area) is drawn on top, so nested regions (WT > TC > ET) all stay visible."""
    order = np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")  # largest first
    stacked = masks[order]
    top = len(order) - 1 - np.argmax(stacked[::-1], axis=0)  # the last (smallest) region covering each pixel
    rgba = colours[order][top].copy()
    rgba[..., 3] = np.where(stacked.any(0), OVERLAY_ALPHA, 0.0)
    return rgba


def draw_case(path: str | Path, image, label, pred, regions: Sequence[str], title: str,
              channel_names: Sequence[str] | None = None, origin: str = "lower") -> int:
    """Write ``path`` (PNG, atomically): one grayscale panel per channel of ``image`` (``(C, H, W)``), then
    ``label`` and ``pred`` (``(len(regions), H, W)`` binary) overlaid on the first channel, one colour per
    region. Arrays are shown transposed (first axis across), ``origin`` as matplotlib's. Returns the
    number of panels."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # a bare Figure draws on the Agg canvas, outside pyplot's state
    from matplotlib.patches import Patch

    image, label, pred = (np.asarray(a, dtype=np.float32) for a in (image, label, pred))
    given = list(channel_names or [])
    names = [given[i] if i < len(given) else f"channel {i}" for i in range(len(image))]
    # the display window of each channel: 1st-99th percentile of its non-zero pixels (a skull-stripped
    # background of zeros, drawn black, must not decide it)
    shown = np.ma.masked_equal(image, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-zero channel: its window is [0, 1]
        low, high = np.nan_to_num(np.nanpercentile(shown.filled(np.nan).reshape(len(image), -1), [1, 99], axis=1),
                                  nan=np.array([[0.0], [1.0]]))
    high = np.maximum(high, low + 1e-6)
    gray = colormaps["gray"].with_extremes(bad="black")
    colours = np.asarray(colormaps["tab10"].colors)[np.arange(len(regions)) % 10]
    colours = np.concatenate([colours, np.ones((len(regions), 1))], axis=1)
    panels = len(image) + 2
    aspect = image.shape[2] / image.shape[1]  # height / width of a panel (arrays are shown transposed)
    fig = Figure(figsize=(2.4 * panels, 2.4 * aspect + 0.6), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, channel, lo, hi, name in zip(axes, shown, low, high, names):
        ax.imshow(channel.T, cmap=gray, vmin=lo, vmax=hi, origin=origin)
        ax.set_title(name, fontsize=9)
    for ax, masks, name in ((axes[-2], label, "ground truth"), (axes[-1], pred, "prediction")):
        ax.imshow(shown[0].T, cmap=gray, vmin=low[0], vmax=high[0], origin=origin)
        ax.imshow(_overlay(masks > 0.5, colours).transpose(1, 0, 2), origin=origin, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    axes[-1].legend(handles=[Patch(color=c, alpha=OVERLAY_ALPHA, label=r) for c, r in zip(colours, regions)],
                    loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()
    return panels


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "case"


class CaseFigures(EvaluationReport):
    """Attach to an evaluator: for its first ``num_cases`` cases (in evaluation order) write
    ``output_dir/figures/<case>.png`` (:func:`draw_case`): each input channel (``channel_names``), the
    ground truth and the prediction overlaid (one colour per region), titled with the case id and the Dice
    of each region (:func:`case_dice`, the numbers of ``metrics.json`` up to rounding). A 3-D case is
    drawn at the axial slice with the most ground-truth foreground (:func:`figure_slice`). ``num_cases``
    0 draws nothing (the default of the bundles' ``save_figures``). ``foreground_only`` skips items whose
    ground truth is empty (for a slice-level evaluation, whose first slices are mostly tumour-free).

    Reads ``image``, ``label`` and ``pred`` from the decollated output (``pred``/``label`` with one channel
    per region, or the background first) and the case id (``case_key``, with ``slice`` where the items
    are slices) from the batch. ``titles`` and ``dice`` hold what was drawn, by figure name."""

    def __init__(self, output_dir: str, num_cases: int = 0, regions: Sequence[str] = ("WT",),
                 channel_names: Sequence[str] | None = None, case_key: str = "case", origin: str = "lower",
                 foreground_only: bool = False):
        self.folder = Path(output_dir) / "figures"
        self.num_cases = int(num_cases)
        self.regions = list(regions)
        self.channel_names = None if channel_names is None else list(channel_names)
        self.case_key = case_key
        self.origin = origin
        self.foreground_only = bool(foreground_only)
        self.titles: dict[str, str] = {}
        self.dice: dict[str, dict[str, float]] = {}

    def attach(self, engine) -> None:
        if self.num_cases > 0:
            super().attach(engine)

    def reset(self) -> None:
        self.titles.clear()
        self.dice.clear()

    def _collect(self, engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item, out in zip(batch, outputs):
            if len(self.titles) >= self.num_cases:
                return
            if self.foreground_only and not bool((torch.as_tensor(out["label"])[-len(self.regions):] > 0.5).any()):
                continue
            self.draw(self._name(item, len(self.titles)), out["image"], out["label"], out["pred"])

    def _name(self, item: Mapping, index: int) -> str:
        name = str(item.get(self.case_key, f"case{index}"))
        return f"{name}_slice{int(item['slice']):03d}" if "slice" in item else name

    def draw(self, name: str, image, label, pred) -> Path:
        """Draw one case (``(C, *spatial)`` tensors, 2-D or 3-D) as ``<name>.png``; returns its path."""
        image, label, pred = (torch.as_tensor(a).detach().cpu().float() for a in (image, label, pred))
        n = len(self.regions)
        dice = case_dice(pred, label, n)
        z = figure_slice(label[-n:])
        image, label, pred = (a[..., z] if z is not None else a for a in (image, label[-n:], pred[-n:]))
        where = "" if z is None else f" (axial slice {z})"
        title = f"{name}{where}  Dice " + ", ".join(f"{r} {float(d):.3f}" for r, d in zip(self.regions, dice))
        path = self.folder / f"{_file_name(name)}.png"
        draw_case(path, image.numpy(), label.numpy(), pred.numpy(), self.regions, title, self.channel_names,
                  self.origin)
        self.titles[name] = title
        self.dice[name] = {r: float(d) for r, d in zip(self.regions, dice)}
        logger.info("saved %s", path)
        return path

    def __call__(self, engine) -> None:
        logger.info("figures of %d case(s) in %s", len(self.titles), self.folder)


def stack_figures(rows: Mapping[str, str | Path], path: str | Path) -> Path:
    """Write ``path`` (PNG, atomically): the PNGs of ``rows`` (label -> file) one above the other, each
    labelled (e.g. a case's figure by the method on top of the baseline's)."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    images = {label: imread(str(p)) for label, p in rows.items()}
    dpi = 100
    width = max(a.shape[1] for a in images.values()) / dpi
    heights = [a.shape[0] / dpi + 0.3 for a in images.values()]
    fig = Figure(figsize=(width, sum(heights)), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(images), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (label, img) in zip(axes, images.items()):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, loc="left", fontsize=12, fontweight="bold")
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()
    return Path(path)
