"""Spatial normalisation to templates, a drop-in for sMRIPrep's workflow of the same name."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.utility import TemplateSource
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
        (optional) Its brain mask: the test-time refinements count the similarity only
        inside it and inside the template's brain mask (used whenever the template has
        one), as ANTs' ``-x``; no image is skull-stripped (the networks align brains and
        ignore the head).
    lesion_mask
        (optional) Accepted for compatibility and ignored (the similarity masks are
        brain masks; a lesion is not cut out of them yet).
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
    reg_wf = init_synthmorph_wf(mode=mode, use_gpu=use_gpu, omp_nthreads=omp_nthreads,
                                extent=extent, regularization=regularization,
                                weights=weights, name="synthmorph_wf")
    workflow.connect([
        (inputnode, tpl_source, [("template", "template")]),
        (inputnode, reg_wf, [("moving_image", "inputnode.moving_image"),
                             ("moving_mask", "inputnode.moving_mask")]),
        (tpl_source, reg_wf, [("t1w_file", "inputnode.fixed_image"),
                              ("brain_mask", "inputnode.fixed_mask")]),
        (reg_wf, poutputnode, [("outputnode.forward_transform", "anat2std_xfm"),
                               ("outputnode.inverse_transform", "std2anat_xfm")]),
        (tpl_source, poutputnode, [("name", "template"), ("spec", "template_spec")]),
        (poutputnode, outputnode, [(f, f) for f in OUTPUT_FIELDS]),
    ])
    return workflow
