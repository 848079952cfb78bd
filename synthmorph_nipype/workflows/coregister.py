"""Within-subject, cross-contrast alignment (T2w, FLAIR, PDw -> T1w)."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.utility import ApplyMask
from ..vocabulary import AFFINE_MODES, check
from .registration import registration_node


def init_coregister_wf(
    *,
    mode: str = "rigid",
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    extent: int = 256,
    weights: Sequence[str] | None = None,
    refine_affine: int | None = None,
    name: str = "coregister_wf",
) -> pe.Workflow:
    """Align one contrast of a subject onto another (e.g. T2w onto T1w), rigid or affine.

    SynthMorph's features do not depend on contrast, so the same model aligns T2w,
    FLAIR or PDw images to the T1w without a contrast-specific cost function.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_nipype.workflows import init_coregister_wf
            wf = init_coregister_wf()

    Parameters
    ----------
    mode : :obj:`str`
        ``rigid`` (default: same head, six degrees of freedom) or ``affine``.
    use_gpu, omp_nthreads, extent, weights, refine_affine
        As :func:`~synthmorph_nipype.workflows.init_synthmorph_wf` (``refine_affine``:
        test-time refinement steps of the matrix; None: what the weights recommend).
    name : :obj:`str`
        Workflow name.

    Inputs
    ------
    moving_image
        The image to align (e.g. T2w).
    fixed_image
        The reference of the same subject (e.g. T1w).
    fixed_mask
        (optional) Brain mask of the reference: the aligned image is masked with it for
        quality control (``moved_masked``).
    init_transform
        (optional) Initial affine, moving to fixed.

    Outputs
    -------
    forward_transform
        Moving to fixed, ITK text (``.txt``).
    inverse_transform
        Fixed to moving, ITK text.
    forward_lta
        Moving to fixed as FreeSurfer LTA (for ``mri_vol2vol``/``bbregister`` users).
    moved_image
        The moving image on the reference grid.
    moved_masked
        ``moved_image`` masked by ``fixed_mask`` (``moved_image`` when no mask).

    >>> init_coregister_wf(mode="affine").get_node("coreg").inputs.mode
    'affine'
    """
    check("coregistration mode", mode, AFFINE_MODES)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["moving_image", "fixed_image", "fixed_mask", "init_transform"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["forward_transform", "inverse_transform", "forward_lta", "moved_image",
                "moved_masked"]), name="outputnode")
    coreg = registration_node(mode, name="coreg", use_gpu=use_gpu, omp_nthreads=omp_nthreads,
                              extent=extent, weights=weights)
    if refine_affine is not None:
        coreg.inputs.refine_affine = refine_affine
    mask_moved = pe.Node(ApplyMask(), name="mask_moved", run_without_submitting=True)
    workflow.connect([
        (inputnode, coreg, [("moving_image", "moving_image"), ("fixed_image", "fixed_image"),
                            ("init_transform", "init_transform")]),
        (coreg, mask_moved, [("moved_image", "in_file")]),
        (inputnode, mask_moved, [("fixed_mask", "in_mask")]),
        (coreg, outputnode, [("forward_transform", "forward_transform"),
                             ("inverse_transform", "inverse_transform"),
                             ("forward_lta", "forward_lta"),
                             ("moved_image", "moved_image")]),
        (mask_moved, outputnode, [("out_file", "moved_masked")]),
    ])
    return workflow
