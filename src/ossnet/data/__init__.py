"""Data: cases and dataset layouts (readers), targets, preprocessing + cache, synthetic data, summary."""

from ossnet.data.case import Case, CaseHeader, CaseSource
from ossnet.data.preprocess import (
    Geometry,
    PreparedCache,
    PreparedCase,
    PreprocessConfig,
    border_band,
    dataset_preprocess_config,
    prepare_case,
)
from ossnet.data.readers import LAYOUT_HELP, LAYOUTS, Dataset, LayoutChoice, open_dataset
from ossnet.data.summary import summarize_dataset
from ossnet.data.synthetic import write_synthetic_dataset
from ossnet.data.targets import Target, get_target

__all__ = [
    "LAYOUT_HELP", "LAYOUTS", "Case", "CaseHeader", "CaseSource", "Dataset", "Geometry", "LayoutChoice", "PreparedCache", "PreparedCase",
    "PreprocessConfig", "Target", "border_band", "dataset_preprocess_config", "get_target", "open_dataset", "prepare_case",
    "summarize_dataset", "write_synthetic_dataset",
]
