"""Training engines and handlers (MONAI's SupervisedTrainer/Evaluator do the training itself)."""

from .barlow_twins import BarlowTwinsIteration, BarlowTwinsNet
from .seg_contrastive import SegContrastiveIteration
from .handlers import BestModelSaver, LoadCheckpoint, MetricsReport, ResumableCheckpoint

__all__ = ["SegContrastiveIteration", "BarlowTwinsIteration", "BarlowTwinsNet", "BestModelSaver", "LoadCheckpoint", "MetricsReport", "ResumableCheckpoint"]
