"""Inference: the decoding engine (dense / coarse-to-fine / guided) and, in sibling modules, prediction and export."""

from ossnet.inference.engine import MODES, DecodeOptions, SegmentationResult, cell_prior, decode_chunked, segment

__all__ = ["MODES", "DecodeOptions", "SegmentationResult", "cell_prior", "decode_chunked", "segment"]
