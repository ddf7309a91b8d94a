"""Losses of the medssl methods (context restoration uses torch's MSELoss, its L2 loss)."""

from .cluster_resupervision import ClusterReSupervisionLoss, cluster_maps, masked_contributions
from .lesion_contrastive import LesionAwareContrastiveLoss
from .semi_cml import AreaSimilarityContrastiveLoss, MutualLearningLoss

__all__ = ["AreaSimilarityContrastiveLoss", "ClusterReSupervisionLoss", "cluster_maps", "masked_contributions", "LesionAwareContrastiveLoss", "MutualLearningLoss"]
