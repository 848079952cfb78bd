"""Nipype interfaces: SynthMorph registration and resampling nodes, and small helpers."""

from .registration import (
    SynthMorphApply,
    SynthMorphRegister,
    estimate_mem_gb,
    synthmorph_command,
)
from .utility import ApplyMask, TemplateSource

__all__ = ["ApplyMask", "SynthMorphApply", "SynthMorphRegister", "TemplateSource",
           "estimate_mem_gb", "synthmorph_command"]
