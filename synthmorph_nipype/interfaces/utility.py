"""Small in-process helpers for the workflows: template files and brain masking.

These are light (nibabel only), so they run as ``SimpleInterface``\\ s, unlike the
registration itself (see :mod:`synthmorph_nipype.interfaces.registration`).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.templates import resolve_template


class _TemplateSourceInputSpec(BaseInterfaceInputSpec):
    template = traits.Str(mandatory=True,
                          desc="template name[:entity-value...] or a template image path")


class _TemplateSourceOutputSpec(TraitedSpec):
    name = traits.Str(desc="template name (e.g. MNI152NLin2009aSym)")
    spec = traits.Dict(desc="template specification entities (e.g. {'res': '2'})")
    t1w_file = File(exists=True, desc="the template's T1-weighted image")
    brain_mask = traits.Either(None, File(exists=True), desc="its brain mask, if any")


class TemplateSource(SimpleInterface):
    """Name, specification and files of a template, available offline (nilearn's
    ``MNI152NLin2009aSym``, ``$TEMPLATEFLOW_HOME`` or an image path)."""

    input_spec = _TemplateSourceInputSpec
    output_spec = _TemplateSourceOutputSpec

    def _run_interface(self, runtime):
        tpl = resolve_template(self.inputs.template, runtime.cwd)
        self._results.update(name=tpl.name, spec=tpl.spec, t1w_file=tpl.t1w,
                             brain_mask=tpl.mask)
        return runtime


class _ApplyMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image")
    in_mask = traits.Either(None, File(exists=True), desc="mask on the same grid; none: "
                            "the image passes through unchanged")


class _ApplyMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the masked image (or the input when no mask)")


class ApplyMask(SimpleInterface):
    """Zero an image outside a mask (for brain-only registration and QC). Without a mask
    the input file itself is passed on, so nothing is copied."""

    input_spec = _ApplyMaskInputSpec
    output_spec = _ApplyMaskOutputSpec

    def _run_interface(self, runtime):
        mask_file = self.inputs.in_mask if isdefined(self.inputs.in_mask) else None
        if not mask_file:
            self._results["out_file"] = self.inputs.in_file
            return runtime
        img, mask = nb.load(self.inputs.in_file), nb.load(mask_file)
        if mask.shape[:3] != img.shape[:3] or not np.allclose(mask.affine, img.affine,
                                                              atol=1e-3):
            raise ValueError(f"{mask_file}: mask grid differs from {self.inputs.in_file}")
        data = np.asanyarray(img.dataobj)
        keep = np.asanyarray(mask.dataobj) > 0
        if data.ndim > 3:
            keep = keep.reshape(keep.shape[:3] + (1,) * (data.ndim - 3))
        out = nb.Nifti1Image(np.where(keep, data, 0).astype(data.dtype), img.affine,
                             img.header)
        name = Path(self.inputs.in_file).name
        stem = name[:-7] if name.endswith(".nii.gz") else Path(name).stem
        self._results["out_file"] = os.path.join(runtime.cwd, f"{stem}_masked.nii.gz")
        out.to_filename(self._results["out_file"])
        return runtime
