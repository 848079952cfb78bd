"""Pairwise SynthMorph registration as a Nipype workflow: affine, then deformable."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.registration import SynthMorphRegister, estimate_mem_gb
from ..vocabulary import DEFORM_MODES, DETECTOR_MODES, MODES, check


def registration_node(mode: str, *, name: str, use_gpu: bool = False, omp_nthreads: int = 1,
                      extent: int = 256, regularization: float = 0.5,
                      weights: Sequence[str] | None = None, **inputs) -> pe.Node:
    """A :class:`SynthMorphRegister` node with its threads, GPU flag and memory set."""
    if mode in DEFORM_MODES:  # lambda only enters (and hashes) deformable nodes
        inputs["regularization"] = regularization
    official = any(str(w).endswith(".h5") for w in weights or ())  # FreeSurfer's Keras files
    node = pe.Node(
        SynthMorphRegister(mode=mode, extent=extent, use_gpu=use_gpu, **inputs),
        name=name, n_procs=omp_nthreads,
        mem_gb=estimate_mem_gb(mode, extent, official=official))
    if weights:
        node.inputs.weights = list(weights)
    return node


def init_synthmorph_wf(
    *,
    mode: str = "joint",
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    extent: int = 256,
    regularization: float = 0.5,
    weights: Sequence[str] | None = None,
    refine: int | None = None,
    refine_similarity: str | None = None,
    refine_affine: int | None = None,
    write_lambda: bool = False,
    refine_lambda: float | None = None,
    passes: int | None = None,
    name: str = "synthmorph_wf",
) -> pe.Workflow:
    """Register a moving image to a fixed one with SynthMorph.

    In ``joint`` mode an affine node runs first and the deformable node starts from its
    result (``synthmorph register -m deform -i``), so either step can be cached, rerun
    or scheduled on its own; the deformable node writes the whole map - the affine and
    the warp - as one ITK composite, forward and inverse.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_nipype.workflows import init_synthmorph_wf
            wf = init_synthmorph_wf()

    Parameters
    ----------
    mode : :obj:`str`
        ``joint`` (affine then deformable), ``deform`` (deformable only, from
        ``init_transform`` or images already aligned), ``affine`` or ``rigid``.
    use_gpu : :obj:`bool`
        Run the registration nodes on a CUDA GPU; Nipype's MultiProc then counts them
        against ``n_gpu_procs``.
    omp_nthreads : :obj:`int`
        CPU threads of each registration node (its ``n_procs``).
    extent : :obj:`int`
        Network extent, 192 or 256 voxels.
    regularization : :obj:`float`
        Regularization weight lambda in (0, 1) of the deformable step.
    weights : list of :obj:`str`, optional
        Model files (``-w``); by default the installed or embedded models.
    refine : :obj:`int` or None
        Test-time refinement steps of the deformable node (0: the network's field; None:
        what the weights recommend).
    refine_similarity : :obj:`str` or None
        ``ncc``, ``mse`` or ``mind`` (across contrasts), for ``refine`` (None: what the
        weights recommend).
    refine_lambda : :obj:`float` or None
        Smoothness weight in (0, 1) of the deformable refinement (None: what the weights
        recommend, else ``regularization``).
    refine_affine : :obj:`int` or None
        Test-time refinement steps of the affine node (0: the network's matrix; None:
        what the weights recommend).
    passes : :obj:`int` or None
        Runs of the deformable network as a cascade, each on the images warped by the
        runs before (None: what the weights recommend).
    write_lambda : :obj:`bool`
        Deformable modes with a spatially varying model: also output its voxel-wise
        regularisation weight (``outputnode.lambda_map``, on the fixed grid).
    name : :obj:`str`
        Workflow name.

    Inputs
    ------
    moving_image
        Image to register.
    fixed_image
        Reference image.
    moving_mask
        (optional) Brain mask of the moving image, as ANTs' ``-x``: the test-time
        refinements count the similarity only inside it (the networks, trained to align
        brains and ignore the head, see the whole image; nothing is skull-stripped).
    fixed_mask
        (optional) The same for the fixed image (e.g. a template's brain mask).
    init_transform
        (optional) Initial affine, moving to fixed (ITK or LTA).

    Outputs
    -------
    forward_transform
        Moving to fixed, ITK (``.h5`` composite for deformable modes, ``.txt`` for
        affine ones): resample the moving image onto the fixed grid with it.
    inverse_transform
        Fixed to moving, ITK.
    moved_image
        The moving image resampled onto the fixed grid.
    lambda_map
        With ``write_lambda``: the model's voxel-wise regularisation weight.

    >>> wf = init_synthmorph_wf(mode="joint", omp_nthreads=2)
    >>> sorted(n for n in wf.list_node_names())  # doctest: +NORMALIZE_WHITESPACE
    ['affine_reg', 'deform_reg', 'inputnode', 'outputnode']
    >>> wf.get_node("deform_reg").n_procs
    2
    """
    check("mode", mode, MODES)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["moving_image", "fixed_image", "moving_mask", "fixed_mask",
                "init_transform"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["forward_transform", "inverse_transform", "moved_image", "lambda_map"]),
        name="outputnode")
    common = dict(use_gpu=use_gpu, omp_nthreads=omp_nthreads, extent=extent,
                  regularization=regularization, weights=weights)
    images = [("moving_image", "moving_image"), ("fixed_image", "fixed_image"),
              ("moving_mask", "moving_mask"), ("fixed_mask", "fixed_mask")]

    last = None
    if mode in DETECTOR_MODES:
        affine_reg = registration_node("rigid" if mode == "rigid" else "affine",
                                       name="affine_reg", write_moved=mode != "joint",
                                       **common)
        if refine_affine is not None:
            affine_reg.inputs.refine_affine = refine_affine
        workflow.connect([(inputnode, affine_reg,
                           [*images, ("init_transform", "init_transform")])])
        last = affine_reg
    if mode in DEFORM_MODES:
        deform_reg = registration_node("deform", name="deform_reg", **common)
        if refine is not None:
            deform_reg.inputs.refine = refine
        if refine_similarity is not None:
            deform_reg.inputs.refine_similarity = refine_similarity
        if refine_lambda is not None:
            deform_reg.inputs.refine_lambda = refine_lambda
        if passes is not None:
            deform_reg.inputs.passes = passes
        deform_reg.inputs.write_lambda = write_lambda
        if write_lambda:
            workflow.connect(deform_reg, "lambda_map", outputnode, "lambda_map")
        workflow.connect([(inputnode, deform_reg, images)])
        if last is not None:
            workflow.connect(last, "forward_transform", deform_reg, "init_transform")
        else:
            workflow.connect(inputnode, "init_transform", deform_reg, "init_transform")
        last = deform_reg
    workflow.connect([
        (last, outputnode, [("forward_transform", "forward_transform"),
                            ("inverse_transform", "inverse_transform"),
                            ("moved_image", "moved_image")]),
    ])
    return workflow
