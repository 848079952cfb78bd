"""Nipype workflows (``init_*_wf`` factories) built on the SynthMorph interfaces."""

from .coregister import init_coregister_wf
from .registration import init_synthmorph_wf
from .template import init_register_template_wf

__all__ = ["init_coregister_wf", "init_register_template_wf", "init_synthmorph_wf"]
