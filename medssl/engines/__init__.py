"""Training engines and handlers (MONAI's SupervisedTrainer/Evaluator do the training itself)."""

from .handlers import BestModelSaver, LoadCheckpoint, MetricsReport, ResumableCheckpoint

__all__ = ["BestModelSaver", "LoadCheckpoint", "MetricsReport", "ResumableCheckpoint"]
