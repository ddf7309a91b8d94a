"""The threshold of a probability map (e.g. a normalised CAM) chosen on validation slices before a test evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class ThresholdSearch:
    """Choose the threshold at which a network's probability map ``(B, 1, *spatial)`` in [0, 1] is binarised,
    by the best mean Dice over the tumour slices of the ``split`` cases of ``datalist`` (validation: the way
    K and the training length are chosen; never the test cases), over a grid of ``thresholds``.

    For :class:`medssl.networks.CAMOutput` ``"cam"`` the map is the ReLU'd CAM divided by its per-slice maximum,
    so the grid is of fractions of that maximum (the plain-CAM rule fixes 0.5). Gated, it is 0 on the slices the
    classifier calls tumour-free and reaches 1 on the others, so at every threshold in (0, 1] the same slices
    get a predicted pixel: the false-positive rate on tumour-free slices does not depend on the choice, and Dice
    on tumour slices (the benchmark's measure) is what decides.

    :meth:`run` builds MONAI's ``SupervisedEvaluator`` over ``slices(cases)`` (only the items whose
    ``class_key`` is 1: tumour slices, as :class:`WeakSegReport` scores Dice) with ``handlers`` attached (e.g.
    :class:`LoadCheckpoint` of the evaluated weights), binarises each map at every threshold at once
    (:class:`medssl.transforms.ThresholdGridd`: one channel per threshold) and scores all of them in one pass
    with MONAI's ``MeanDice`` (``reduction="mean_batch"``: one mean over slices per threshold). The best
    threshold (the lowest on a tie) becomes :attr:`threshold`; :attr:`record` (``threshold``,
    ``threshold_validation_dice`` and ``threshold_selection``: split, cases, slices, grid and Dice per
    threshold) is written to ``output_file`` (JSON, atomically). With an empty grid :meth:`run` does nothing
    and :attr:`threshold` is ``default``.

    Run it before the evaluator that uses :attr:`threshold` is built (the bundle's ``evaluate.json`` runs it
    in ``initialize``). ``slices`` is called only by :meth:`run`, so a stage that does not search reads no data.
    """

    def __init__(self, network: torch.nn.Module, datalist: dict, slices: Callable[[list], list],
                 thresholds: Sequence[float] = (), default: float = 0.5, split: str = "validation",
                 preprocessing: Callable | None = None, handlers: Sequence = (), output_file: str | None = None,
                 class_key: str = "class", device: str | torch.device = "cpu", amp: bool = False):
        self.network, self.datalist, self.slices = network, datalist, slices
        self.thresholds = [float(t) for t in thresholds]
        self.default, self.split = float(default), split
        self.preprocessing, self.handlers, self.output_file = preprocessing, list(handlers), output_file
        self.class_key, self.device, self.amp = class_key, device, amp
        self.chosen: float | None = None
        self.record: dict = {}

    @property
    def threshold(self) -> float:
        """The chosen threshold once :meth:`run` has chosen one, else ``default``."""
        return self.default if self.chosen is None else self.chosen

    def run(self) -> float:
        """Choose the threshold (once; nothing with an empty grid) and return it."""
        if not self.thresholds or self.chosen is not None:
            return self.threshold
        from monai.data import DataLoader, Dataset
        from monai.engines import SupervisedEvaluator
        from monai.handlers import MeanDice, from_engine
        from monai.transforms import Compose, RepeatChanneld

        from ..data import DataError, evaluation_cases
        from ..transforms import ThresholdGridd
        from ..utils import atomic_write_json

        cases = evaluation_cases(self.datalist, self.split)
        items = [d for d in self.slices(cases) if float(d[self.class_key]) > 0.5]
        source = self.datalist.get("source", "datalist")
        if not items:
            raise DataError([f"{source}: no {self.split} slice with tumour ({len(cases)} case(s)); expected some to "
                             f"choose the threshold on"])
        post = Compose([ThresholdGridd("pred", self.thresholds), RepeatChanneld("label", len(self.thresholds))])
        dice = MeanDice(include_background=True, reduction="mean_batch",
                        output_transform=from_engine(["pred", "label"]))
        loader = DataLoader(Dataset(items, self.preprocessing), batch_size=1)
        evaluator = SupervisedEvaluator(device=torch.device(self.device), val_data_loader=loader, network=self.network,
                                        postprocessing=post, val_handlers=self.handlers, amp=self.amp)
        dice.attach(evaluator, "threshold_dice")  # a vector (one Dice per threshold): no key metric to compare
        evaluator.run()
        scores = torch.as_tensor(evaluator.state.metrics["threshold_dice"]).reshape(-1).tolist()
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the lowest threshold on a tie
        self.chosen = self.thresholds[best]
        names = sorted({str(d.get("case", "")) for d in items})
        self.record = {"threshold": self.chosen, "threshold_validation_dice": round(scores[best], 6),
                       "threshold_selection": {"split": self.split, "cases": names, "num_slices": len(items),
                                               "thresholds": self.thresholds,
                                               "dice": [round(s, 6) for s in scores],
                                               "rule": "best mean Dice over the split's slices with tumour"}}
        if self.output_file:
            atomic_write_json(self.record, self.output_file)
        return self.chosen
