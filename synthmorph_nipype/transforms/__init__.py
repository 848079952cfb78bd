"""Spatial transforms (pull-back maps in RAS millimetres) and their file formats."""

from .base import Affine, Chain, DisplacementField, ImageGrid, Transform, dense_field
from .io import SUPPORTED_SUFFIXES, LoadedTransform, load_transform, save_transform
from .lta import read_lta, write_lta

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Affine",
    "Chain",
    "DisplacementField",
    "ImageGrid",
    "LoadedTransform",
    "Transform",
    "dense_field",
    "load_transform",
    "read_lta",
    "save_transform",
    "write_lta",
]
