"""Training engines and handlers (MONAI's SupervisedTrainer/Evaluator do the training itself)."""

from .barlow_twins import BarlowTwinsIteration, BarlowTwinsNet
from .seg_contrastive import SegContrastiveIteration
from .semi import (ChooseStronger, CycledLoader, MeanTeacherIteration, PseudoLabelIteration, SemiCMLIteration,
                   sigmoid_rampup)
from .weak import WEAK_METHODS, ClusterReSupervisionIteration, WeakSegReport, weak_or_supervised
from .figures import CaseFigures, stack_figures
from .threshold import ThresholdSearch
from .pretext_health import PretextHealth, barlow_health, held_out_batches, restoration_health, untrained_copy
from .block_mix_probe import block_mix_health
from .handlers import (BestModelSaver, check_resume_settings, classification_accuracy, CurveLog, EarlyStopping, LoadCheckpoint, MetricsReport, NonFiniteLossError,
                       ResumableCheckpoint, SettingsMismatchError, seed_epoch, StepSnapshots,
                       StopOnNonFiniteLoss)

__all__ = ["PretextHealth", "block_mix_health", "barlow_health", "held_out_batches", "restoration_health", "untrained_copy", "CaseFigures", "stack_figures", "WEAK_METHODS", "ClusterReSupervisionIteration", "WeakSegReport", "weak_or_supervised", "ThresholdSearch", "ChooseStronger", "CycledLoader", "MeanTeacherIteration", "PseudoLabelIteration", "SemiCMLIteration",
           "sigmoid_rampup", "SegContrastiveIteration", "BarlowTwinsIteration", "BarlowTwinsNet", "BestModelSaver", "classification_accuracy", "CurveLog", "EarlyStopping", "seed_epoch", "StepSnapshots", "SettingsMismatchError", "check_resume_settings", "NonFiniteLossError", "StopOnNonFiniteLoss", "LoadCheckpoint", "MetricsReport", "ResumableCheckpoint"]
