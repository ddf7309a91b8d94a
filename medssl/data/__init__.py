"""Data layer: case discovery for the real layouts, validation, MSD-style splits, public sample."""

from .check import DataError, check_brats_case, check_cases, check_dataset_dir, check_nuclei_case
from .layouts import (BRATS_LABEL_VALUES, BRATS_MODALITIES, BRATS_REGIONS, LAYOUTS, brats_cases, dataset_layout,
                      detect_layout, modality_channel, nuclei_cases)
from .split import (all_training, held_out, bundle_datalist, datalist_digest, evaluation_cases, inference_cases, labelled, load_datalist,
                    make_fold, make_split, select_modalities, unlabelled, write_datalist)
from .sample import DownloadError, download, ensure_sample, prepare
from .slices import (axial_brain_slices, brats_axial_slices, image_level_only, label_slices, training_slices,
                     weak_slice_datalist)
from .tags import TAG_KEYS, axial_tags, read_tags
