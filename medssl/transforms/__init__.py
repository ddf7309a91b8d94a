"""MONAI-style array and dictionary transforms of the medssl methods."""

from .context_swap import RandContextSwap, RandContextSwapd
from .channels import AsChannels, AsChannelsd, SelectModality, SelectModalityd
from .block_mix import RandModalityBlockMix, RandModalityBlockMixd
from .patch_mask import RandPatchMask, RandPatchMaskd
from .views import RandTwoViewsd
from .slices import SelectSlicesd
from .brats import BratsRegionsToLabel, BratsRegionsToLabeld, case_output_name
from .thresholds import ThresholdGrid, ThresholdGridd

__all__ = ["RandTwoViewsd", "SelectSlicesd", "AsChannels", "AsChannelsd", "SelectModality", "SelectModalityd", "RandContextSwap", "RandContextSwapd", "RandModalityBlockMix", "RandModalityBlockMixd", "RandPatchMask", "RandPatchMaskd", "BratsRegionsToLabel", "BratsRegionsToLabeld", "case_output_name", "ThresholdGrid", "ThresholdGridd"]
