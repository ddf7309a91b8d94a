"""MONAI-style array and dictionary transforms of the medssl methods."""

from .context_swap import RandContextSwap, RandContextSwapd
from .brats import BratsRegionsToLabel, BratsRegionsToLabeld, case_output_name

__all__ = ["RandContextSwap", "RandContextSwapd", "BratsRegionsToLabel", "BratsRegionsToLabeld", "case_output_name"]
