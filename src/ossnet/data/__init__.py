"""Data: cases and dataset layouts (readers), targets, fingerprint and plan, preprocessing, the cache of
prepared cases, tiles, augmentation, phantoms and synthetic datasets, summary."""

from ossnet.data.augment import AUGMENT_PRESETS, AugmentConfig, augment_volume
from ossnet.data.cache import PreparedCache
from ossnet.data.case import Case, CaseHeader, CaseSource
from ossnet.data.plan import (
    DatasetFingerprint,
    dataset_preprocess_config,
    describe_plan,
    fingerprint_dataset,
    plan_preprocessing,
    planned_shapes,
    tile_counts,
)
from ossnet.data.preprocess import Geometry, PreprocessConfig, border_band
from ossnet.data.readers import LAYOUT_HELP, LAYOUTS, Dataset, LayoutChoice, channel_names_known, open_dataset
from ossnet.data.summary import CheckedCase, DatasetSummary, InfoOptions, summarize_dataset
from ossnet.data.synthetic import Grid, SynthOptions, resample_nifti, write_synthetic_dataset
from ossnet.data.targets import Target, get_target
from ossnet.data.working import PreparedCase, WorkingVolume, prepare_case

__all__ = [
    "AUGMENT_PRESETS", "LAYOUT_HELP", "LAYOUTS", "AugmentConfig", "Case", "CaseHeader", "CaseSource", "CheckedCase",
    "Dataset",
    "DatasetFingerprint", "DatasetSummary", "Geometry", "Grid", "InfoOptions", "LayoutChoice", "PreparedCache",
    "PreparedCase", "PreprocessConfig", "SynthOptions", "Target", "augment_volume", "border_band",
    "channel_names_known", "dataset_preprocess_config", "describe_plan", "fingerprint_dataset", "get_target",
    "open_dataset", "plan_preprocessing", "planned_shapes", "prepare_case", "resample_nifti", "summarize_dataset",
    "tile_counts", "write_synthetic_dataset", "WorkingVolume",
]
