"""Nipype interfaces: SynthMorph registration and resampling nodes, and small helpers."""

import os

# No network at run time: Nipype would otherwise ask a web service for its latest version
# whenever an interface is created.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from .registration import (
    SynthMorphApply,
    SynthMorphRegister,
    estimate_mem_gb,
    synthmorph_command,
)
from .utility import ApplyMask, TemplateSource

__all__ = ["ApplyMask", "SynthMorphApply", "SynthMorphRegister", "TemplateSource",
           "estimate_mem_gb", "synthmorph_command"]
