"""SynthMorph networks in PyTorch, laid out layer for layer like the official Keras models."""

from .affine import AffineConfig, AffineDetector
from .joint import HyperUNet, UNet, UNetConfig

__all__ = ["AffineConfig", "AffineDetector", "HyperUNet", "UNet", "UNetConfig"]
