"""Spatial normalisation to templates, a drop-in for sMRIPrep's workflow of the same name."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.utility import ApplyMask, TemplateSource
from ..io.templates import DEFAULT_TEMPLATE
from .registration import init_synthmorph_wf

#: sMRIPrep's fields, so that this workflow can replace its ``register_template_wf``
INPUT_FIELDS = ["lesion_mask", "moving_image", "moving_mask", "template"]
OUTPUT_FIELDS = ["anat2std_xfm", "std2anat_xfm", "template", "template_spec"]


def init_register_template_wf(
    *,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    mode: str = "joint",
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    extent: int = 256,
    regularization: float = 0.5,
    weights: Sequence[str] | None = None,
    name: str = "register_template_wf",
) -> pe.Workflow:
    """Register an anatomical image to one or more templates with SynthMorph.

    Its ``inputnode`` and ``outputnode`` have exactly the fields of sMRIPrep's
    ``init_register_template_wf``, and like it the workflow iterates over ``templates``:
    ``poutputnode`` holds one template's results (parameterized), ``outputnode`` joins
    them into lists. Tagged ``anat.register-template``, it can replace sMRIPrep's
    workflow through niworkflows' ``splice_workflow``.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_nipype.workflows import init_register_template_wf
            wf = init_register_template_wf(templates=["MNI152NLin2009aSym"])

    Parameters
    ----------
    templates : list of :obj:`str`
        Template names with optional specifications (``MNI152NLin2009aSym:res-2``), or
        template image paths. ``MNI152NLin2009aSym`` is the ICBM 2009a nonlinear
        symmetric template nilearn ships (the default; no download); other TemplateFlow
        names work when ``$TEMPLATEFLOW_HOME`` already holds them.
    mode, use_gpu, omp_nthreads, extent, regularization, weights
        As :func:`~synthmorph_nipype.workflows.init_synthmorph_wf`.
    name : :obj:`str`
        Workflow name.

    Inputs
    ------
    moving_image
        The anatomical reference to normalise (e.g. the preprocessed T1w).
    moving_mask
        (optional) Its brain mask. When given, the moving image is skull-stripped before
        registration and the template is used brain-only (masked by its own mask), so
        both sides show the same tissue.
    lesion_mask
        (optional) Accepted for compatibility and ignored: SynthMorph has no cost
        function to mask, and the learned deformation is regularised everywhere.
    template
        Set by the iterable over ``templates``.

    Outputs
    -------
    anat2std_xfm
        Anatomical-to-template transform (ITK ``.h5`` composite; ``.txt`` for affine
        modes), for antsApplyTransforms/nitransforms/fMRIPrep.
    std2anat_xfm
        Template-to-anatomical transform.
    template
        Template name.
    template_spec
        Template specification entities (e.g. ``{'res': '2'}``).

    >>> wf = init_register_template_wf(templates=["MNI152NLin2009aSym", "MNI152NLin2009aSym:res-2"])
    >>> wf.get_node("inputnode").iterables
    ('template', ['MNI152NLin2009aSym', 'MNI152NLin2009aSym:res-2'])
    >>> wf._tag
    'anat.register-template'
    """
    workflow = pe.Workflow(name=name)
    workflow._tag = "anat.register-template"
    inputnode = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    inputnode.iterables = ("template", list(templates))
    poutputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="poutputnode")
    outputnode = pe.JoinNode(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode",
                             joinsource="inputnode")
    tpl_source = pe.Node(TemplateSource(), name="tpl_source", run_without_submitting=True)
    # brain-only template exactly when the moving image is brain-only
    tpl_mask = pe.Node(niu.Function(function=_mask_if, output_names=["mask"]),
                       name="tpl_mask", run_without_submitting=True)
    mask_template = pe.Node(ApplyMask(), name="mask_template", run_without_submitting=True)
    reg_wf = init_synthmorph_wf(mode=mode, use_gpu=use_gpu, omp_nthreads=omp_nthreads,
                                extent=extent, regularization=regularization,
                                weights=weights, name="synthmorph_wf")
    workflow.connect([
        (inputnode, tpl_source, [("template", "template")]),
        (inputnode, tpl_mask, [("moving_mask", "moving_mask")]),
        (tpl_source, tpl_mask, [("brain_mask", "template_mask")]),
        (tpl_source, mask_template, [("t1w_file", "in_file")]),
        (tpl_mask, mask_template, [("mask", "in_mask")]),
        (inputnode, reg_wf, [("moving_image", "inputnode.moving_image"),
                             ("moving_mask", "inputnode.moving_mask")]),
        (mask_template, reg_wf, [("out_file", "inputnode.fixed_image")]),
        (reg_wf, poutputnode, [("outputnode.forward_transform", "anat2std_xfm"),
                               ("outputnode.inverse_transform", "std2anat_xfm")]),
        (tpl_source, poutputnode, [("name", "template"), ("spec", "template_spec")]),
        (poutputnode, outputnode, [(f, f) for f in OUTPUT_FIELDS]),
    ])
    return workflow


def _mask_if(moving_mask=None, template_mask=None):
    """The template's mask when the moving image has one (both brain-only), else None."""
    from nipype.interfaces.base import isdefined

    has = moving_mask is not None and isdefined(moving_mask)
    return template_mask if has else None
