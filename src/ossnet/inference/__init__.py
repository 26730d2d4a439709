"""Inference, layered bottom-up: `engine` (dense / coarse-to-fine / guided decoding of any field), `grid`
(query grids and sampling), `field` (an encoded volume as a field), `calibration` (per-volume decoder
statistics), `unet` (dense U-Net prediction), `volume` (one volume, any model), `predict` (cases in, files out)
and `export` / `postprocess`."""

from ossnet.inference.engine import MODES, DecodeOptions, SegmentationResult, decode_chunked, segment
from ossnet.inference.grid import cell_prior

__all__ = ["MODES", "DecodeOptions", "SegmentationResult", "cell_prior", "decode_chunked", "segment"]
